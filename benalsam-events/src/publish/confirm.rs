//! What the broker's answer to one publish means for its job: the pure classifier behind
//! every decision of the publisher.
//!
//! | the broker answers | verdict | the job |
//! |---|---|---|
//! | ack | [`Verdict::Sent`] | `sent` |
//! | ack with the message returned (no queue bound for its key) | `Refused` (`unroutable`) | `failed`, retried with backoff |
//! | nack | `Refused` (`nack`) | `failed`, retried with backoff |
//! | the channel closed by an error about the messages (a missing exchange) | `Refused` (`refused`), the link is gone | `failed`, retried with backoff |
//! | the connection failed | [`Verdict::Unknown`] | published again on a new connection, same `messageId` |

use lapin::Confirmation;

/// Why the broker, or the publisher itself, refused a job: the `jobs_publish_failed` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Acked with the message returned: no queue is bound for its key.
    Unroutable,
    /// Nacked (or the channel was not in confirm mode).
    Nack,
    /// Refused by the channel (a missing exchange), or by the publisher (a key or a
    /// message too large).
    Refused,
    /// No event type routes the job's table, or its routing key is too long.
    UnroutedTable,
}

impl Refusal {
    /// Every kind, for the metric series that exist from the start.
    pub(crate) const ALL: [Self; 4] = [
        Self::Unroutable,
        Self::Nack,
        Self::Refused,
        Self::UnroutedTable,
    ];

    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Unroutable => "unroutable",
            Self::Nack => "nack",
            Self::Refused => "refused",
            Self::UnroutedTable => "unrouted_table",
        }
    }
}

/// The meaning of one confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Acked and routed.
    Sent,
    /// The broker refused the message itself.
    Refused {
        /// Its kind, the `jobs_publish_failed` label.
        kind: Refusal,
        /// Why, for the job's `error_message`.
        reason: String,
        /// Whether the channel went with it (a soft channel error).
        closes_link: bool,
    },
    /// The connection failed: nothing is known about the message.
    Unknown(String),
}

/// Judges the broker's answer to one publish.
pub(crate) fn judge(answer: &lapin::Result<Confirmation>) -> Verdict {
    match answer {
        Ok(Confirmation::Ack(None)) => Verdict::Sent,
        Ok(Confirmation::Ack(Some(returned))) => Verdict::Refused {
            kind: Refusal::Unroutable,
            reason: format!(
                "unroutable: no queue is bound to exchange {} for routing key {} (broker returned {} {})",
                returned.delivery.exchange,
                returned.delivery.routing_key,
                returned.reply_code,
                returned.reply_text
            ),
            closes_link: false,
        },
        Ok(Confirmation::Nack(_)) => Verdict::Refused {
            kind: Refusal::Nack,
            reason: "the broker refused the message (nack)".to_owned(),
            closes_link: false,
        },
        Ok(Confirmation::NotRequested) => Verdict::Refused {
            kind: Refusal::Nack,
            reason: "the channel was not in confirm mode".to_owned(),
            closes_link: false,
        },
        // A channel-level refusal (a missing exchange, say) is about the messages; anything
        // else is the connection, and says nothing about them.
        Err(error) => match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_)) =>
            {
                Verdict::Refused {
                    kind: Refusal::Refused,
                    reason: format!("RabbitMQ closed the channel: {}", amqp.get_message()),
                    closes_link: true,
                }
            }
            _ => Verdict::Unknown(format!("waiting for a confirm: {error}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lapin::message::{BasicReturnMessage, Delivery};
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

    use super::*;

    fn returned() -> BasicReturnMessage {
        BasicReturnMessage {
            delivery: Delivery::mock(
                1,
                "benalsam.listings".into(),
                "listing.insert".into(),
                false,
                Vec::new(),
            ),
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }
    }

    #[test]
    fn every_answer_has_its_verdict() {
        assert_eq!(judge(&Ok(Confirmation::Ack(None))), Verdict::Sent);
        let Verdict::Refused { kind, reason, .. } = judge(&Ok(Confirmation::Ack(Some(returned()))))
        else {
            panic!("a returned message is a refusal");
        };
        assert_eq!(kind.as_str(), "unroutable");
        assert!(
            reason.contains("listing.insert") && reason.contains("312"),
            "{reason}"
        );
        assert!(matches!(
            judge(&Ok(Confirmation::Nack(None))),
            Verdict::Refused {
                kind: Refusal::Nack,
                ..
            }
        ));

        let missing_exchange = lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no exchange 'x'".into(),
        )));
        assert!(matches!(
            judge(&Err(missing_exchange)),
            Verdict::Refused {
                kind: Refusal::Refused,
                closes_link: true,
                ..
            }
        ));

        let lost = lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        ))));
        assert!(matches!(judge(&Err(lost)), Verdict::Unknown(_)));
    }
}
