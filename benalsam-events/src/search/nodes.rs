//! Several search nodes, one in use at a time.
//!
//! The search client's own multi-node pool is round-robin and learns nothing from a failed
//! request: it would keep sending every other bulk request to a dead node. Here each node
//! has a client of its own, and every request goes to the node *in use*. A request that the
//! node fails *as a node* (no answer, a gateway's 502, 503 or 504) moves the node in use on
//! to the next and is sent again there, until a node answers or every node has failed it
//! once; only then does the caller see the failure (the consumer's circuit breaker opens,
//! and its probes go round the nodes the same way). Any other answer is the cluster's, and
//! the same on every node: a busy 429, a 500, a refused request, the items of a bulk answer
//! are the caller's business, as with one node.
//!
//! Sending a request again is safe: every write carries its job id as external version, so
//! an item the failed node applied after all is refused by the next as superseded (409, the
//! same document), never written twice or over a newer one.
//!
//! The decisions (is this a node failure, which node is in use after one, which node a
//! request tries next) are the pure functions [`node_failed`], [`after_failure`] and
//! [`Round::next`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use elasticsearch::Elasticsearch;
use elasticsearch::http::{Method, StatusCode};
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;

use crate::config::SearchUrl;
use crate::error::Result;
use crate::search::client as search;

/// The search nodes of one cluster, each with its own client, and the one in use.
///
/// Built from a [`SearchUrl`] listing the nodes ([`SearchNodes::new`]), or from one client
/// (`From<Elasticsearch>`, a single node whose address it does not know). Clones share the
/// node in use.
#[derive(Clone)]
pub struct SearchNodes {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Vec<Node>,
    /// Index of the node requests go to.
    in_use: AtomicUsize,
    /// Moves from one node to another.
    switches: Counter,
}

struct Node {
    client: Elasticsearch,
    /// Its URL, redacted; `None` for a client given as such.
    name: Option<String>,
}

impl std::fmt::Debug for SearchNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .inner
            .nodes
            .iter()
            .map(|n| n.name.as_deref().unwrap_or("(a client)"))
            .collect();
        f.debug_struct("SearchNodes")
            .field("nodes", &names)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl From<Elasticsearch> for SearchNodes {
    fn from(client: Elasticsearch) -> Self {
        Self::of(vec![Node { client, name: None }])
    }
}

impl SearchNodes {
    /// A client per node of `url` (see [`SearchUrl::client`](crate::config::SearchUrl::client)), each request timing out
    /// after `timeout`; the first node is in use.
    pub fn new(url: &SearchUrl, timeout: Duration) -> Result<Self> {
        let nodes = url
            .addresses()
            .iter()
            .map(|address| {
                Ok(Node {
                    client: search::client(address, timeout)?,
                    name: Some(address.redacted()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::of(nodes))
    }

    fn of(nodes: Vec<Node>) -> Self {
        Self {
            inner: Arc::new(Inner {
                nodes,
                in_use: AtomicUsize::new(0),
                switches: Counter::default(),
            }),
        }
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.inner.nodes.len()
    }

    /// Never: there is always at least one node.
    pub fn is_empty(&self) -> bool {
        self.inner.nodes.is_empty()
    }

    /// The URL (redacted) of the node requests go to; `None` for a client given as such.
    pub fn in_use(&self) -> Option<String> {
        let index = self.inner.in_use.load(Ordering::Relaxed);
        self.inner.nodes.get(index).and_then(|n| n.name.clone())
    }

    /// The counter of moves from one node to the next, for the metrics.
    pub(crate) fn switches(&self) -> Counter {
        self.inner.switches.clone()
    }

    /// Sends one request to the node in use and reads its answer's bytes, moving on to the
    /// next node while nodes fail it (see the [module documentation](self)). After a whole
    /// round of failed nodes, the last node's failure: its gateway answer, or the error of
    /// no answer.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        content_type: &'static str,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let count = self.len();
        let mut round = Round::new(count);
        let mut last = None;
        while let Some(index) = round.next(self.inner.in_use.load(Ordering::Relaxed)) {
            let answer = search::send(
                &self.inner.nodes[index].client,
                method,
                path,
                body,
                content_type,
            )
            .await;
            let why = match &answer {
                Ok((status, _)) if !node_failed(Some(status.as_u16())) => return answer,
                Ok((status, _)) => format!("{method:?} {path} answered {status}"),
                Err(error) => error.to_string(),
            };
            self.failed(index, &why);
            last = Some(answer);
        }
        // A round has at least one node, so there is a last answer.
        last.unwrap_or_else(|| {
            Err(crate::error::Error::search(
                format!("{method:?} {path}"),
                "no search node is configured",
            ))
        })
    }

    /// [`send`](Self::send) with a JSON body, reading a JSON answer.
    pub(crate) async fn json_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let answer = self
            .send(method, path, body.as_deref(), "application/json")
            .await?;
        search::parse_answer(method, path, answer)
    }

    /// Records that node `failed` failed a request: the node in use moves on if it still is
    /// that node (another request may have moved it already).
    fn failed(&self, failed: usize, why: &str) {
        let count = self.len();
        let moved =
            self.inner
                .in_use
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |in_use| {
                    let next = after_failure(in_use, failed, count);
                    (next != in_use).then_some(next)
                });
        if let Ok(from) = moved {
            let to = after_failure(from, failed, count);
            let name = |index: usize| {
                self.inner.nodes[index]
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("node {}", index + 1))
            };
            self.inner.switches.inc();
            tracing::warn!(
                from = %name(from),
                to = %name(to),
                reason = why,
                "search node unavailable; moving to the next"
            );
        }
    }
}

/// Whether a request's outcome says the *node* is gone, rather than the cluster busy or the
/// request wrong: no answer at all (`None`: refused, cut, timed out), or a gateway's answer
/// that the node behind it is unreachable or not serving (502, 503, 504). Another node may
/// well serve the request. A 429 or another 5xx comes from a node that answers: the cluster
/// is busy or failing, on every node alike.
pub(crate) fn node_failed(status: Option<u16>) -> bool {
    matches!(status, None | Some(502..=504))
}

/// The node in use after node `failed` failed a request while `in_use` was in use: the one
/// after `failed` if it is still in use; otherwise another request has moved on already,
/// and that move stands (two requests failing on one dead node move past it once, not
/// twice).
pub(crate) fn after_failure(in_use: usize, failed: usize, count: usize) -> usize {
    if in_use == failed && count > 0 {
        (failed + 1) % count
    } else {
        in_use
    }
}

/// One request's way round the nodes: each node at most once.
#[derive(Debug, Clone)]
pub(crate) struct Round {
    tried: Vec<bool>,
}

impl Round {
    pub(crate) fn new(count: usize) -> Self {
        Self {
            tried: vec![false; count],
        }
    }

    /// The node to try next, given the node in use now: that one, unless this request
    /// already tried it (the node in use moved back round meanwhile), then the first after
    /// it that it has not; `None` once it tried every node.
    pub(crate) fn next(&mut self, in_use: usize) -> Option<usize> {
        let count = self.tried.len();
        let index = (0..count)
            .map(|step| (in_use + step) % count)
            .find(|&index| !self.tried[index])?;
        self.tried[index] = true;
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn only_no_answer_and_gateway_answers_are_node_failures() {
        assert!(node_failed(None), "refused, cut, timed out");
        for status in [502, 503, 504] {
            assert!(node_failed(Some(status)), "{status}");
        }
        for status in [200, 201, 400, 401, 403, 404, 409, 413, 429, 500, 501, 505] {
            assert!(!node_failed(Some(status)), "{status}");
        }
    }

    #[test]
    fn a_failure_moves_past_the_failed_node_once() {
        assert_eq!(after_failure(0, 0, 3), 1);
        assert_eq!(after_failure(2, 2, 3), 0, "round the end");
        assert_eq!(
            after_failure(1, 0, 3),
            1,
            "another request moved on already"
        );
        assert_eq!(after_failure(0, 0, 1), 0, "one node: nowhere to go");
    }

    #[test]
    fn a_round_starts_at_the_node_in_use_and_ends_after_every_node() {
        let mut round = Round::new(3);
        assert_eq!(round.next(1), Some(1));
        assert_eq!(round.next(2), Some(2));
        assert_eq!(round.next(0), Some(0));
        assert_eq!(round.next(1), None);
        let mut round = Round::new(3);
        assert_eq!(round.next(2), Some(2));
        assert_eq!(round.next(2), Some(0), "tried: the next one");
        assert_eq!(round.next(2), Some(1));
        assert_eq!(round.next(2), None);
    }

    proptest! {
        /// A request failing on every node, while other requests move the node in use
        /// anyhow, tries each node exactly once before it gives up.
        #[test]
        fn a_round_tries_every_node_once_whatever_the_others_do(
            count in 1usize..8,
            moves in proptest::collection::vec(0usize..8, 0..16),
        ) {
            let mut round = Round::new(count);
            let mut in_use = 0;
            let mut tried = Vec::new();
            let mut moves = moves.into_iter();
            while let Some(index) = round.next(in_use) {
                tried.push(index);
                in_use = after_failure(in_use, index, count);
                // Another request's move, sometimes.
                if let Some(to) = moves.next() {
                    in_use = to % count;
                }
            }
            tried.sort_unstable();
            prop_assert_eq!(tried, (0..count).collect::<Vec<_>>());
        }

        /// Alone, the node in use walks the nodes in order from where it was, and the first
        /// node that answers is where it stays: later requests start there.
        #[test]
        fn alone_the_node_in_use_is_the_first_that_answers_in_order(
            count in 1usize..8,
            start in 0usize..8,
            up in proptest::collection::vec(any::<bool>(), 8),
        ) {
            let start = start % count;
            let mut in_use = start;
            let mut round = Round::new(count);
            let mut answered = None;
            while let Some(index) = round.next(in_use) {
                prop_assert_eq!(index, in_use, "alone, a request goes to the node in use");
                if up[index] {
                    answered = Some(index);
                    break;
                }
                in_use = after_failure(in_use, index, count);
            }
            let expected = (0..count).map(|step| (start + step) % count).find(|&i| up[i]);
            prop_assert_eq!(answered, expected);
            prop_assert_eq!(in_use, expected.unwrap_or(start), "a whole round ends where it began");
        }
    }
}
