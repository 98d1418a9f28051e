//! The topology written out: the least privileges of the two components, and a RabbitMQ
//! definitions file.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Argument, SYSTEM_EXCHANGE, Topology};

impl Topology {
    /// The least privileges of the two components on this topology, as lines of
    /// `user<TAB>configure<TAB>write<TAB>read` (regular expressions, as RabbitMQ's
    /// `set_permissions` takes them; `^$` grants nothing):
    ///
    /// - `benalsam-bridge` declares everything (configure on every exchange and queue; read
    ///   on the exchanges and write on the queues to bind them), publishes events and
    ///   heartbeats (write on the exchanges), and, creating a queue with a dead-letter
    ///   exchange, needs read on the queue and write on that exchange;
    /// - `benalsam-consumer` declares nothing: it reads the queues it consumes, and writes
    ///   only dead letters and heartbeats. It cannot publish an event.
    pub fn permissions(&self) -> String {
        let dead_letter_exchanges: Vec<&str> = self
            .queues
            .iter()
            .filter_map(|q| match q.arguments.get("x-dead-letter-exchange") {
                Some(Argument::Str(dlx)) => Some(dlx.as_str()),
                _ => None,
            })
            .collect();
        let consumed: Vec<&str> = self
            .queues
            .iter()
            .filter(|q| q.arguments.contains_key("x-dead-letter-exchange"))
            .map(|q| q.name.as_str())
            .collect();
        let exchanges: Vec<&str> = self.exchanges.iter().map(|e| e.name.as_str()).collect();
        let queues: Vec<&str> = self.queues.iter().map(|q| q.name.as_str()).collect();
        let everything = [exchanges.as_slice(), queues.as_slice()].concat();
        let bridge_read = [exchanges.as_slice(), consumed.as_slice()].concat();
        let consumer_write = [dead_letter_exchanges.as_slice(), &[SYSTEM_EXCHANGE]].concat();
        format!(
            "benalsam-bridge\t{all}\t{all}\t{read}\nbenalsam-consumer\t^$\t{write}\t{consume}\n",
            all = any_of(&everything),
            read = any_of(&bridge_read),
            write = any_of(&consumer_write),
            consume = any_of(&consumed),
        )
    }

    /// The RabbitMQ definitions file (`rabbitmqctl import_definitions`, or the management
    /// plugin's `load_definitions`) holding this topology in `vhost`.
    pub fn definitions(&self, vhost: &str) -> Value {
        let arguments = |args: &BTreeMap<String, Argument>| {
            args.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Argument::Str(s) => json!(s),
                        Argument::Int(i) => json!(i),
                    };
                    (k.clone(), v)
                })
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "vhosts": [{ "name": vhost }],
            "exchanges": self.exchanges.iter().map(|e| json!({
                "name": e.name, "vhost": vhost, "type": "topic",
                "durable": true, "auto_delete": false, "internal": false, "arguments": {}
            })).collect::<Vec<_>>(),
            "queues": self.queues.iter().map(|q| json!({
                "name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                "arguments": arguments(&q.arguments)
            })).collect::<Vec<_>>(),
            "bindings": self.bindings.iter().map(|b| json!({
                "source": b.exchange, "vhost": vhost, "destination": b.queue,
                "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}
            })).collect::<Vec<_>>(),
        })
    }
}

/// A regular expression matching exactly `names` (each once, in order).
fn any_of(names: &[&str]) -> String {
    let mut unique: Vec<&str> = Vec::new();
    for name in names {
        if !unique.contains(name) {
            unique.push(name);
        }
    }
    let escaped: Vec<String> = unique
        .iter()
        .map(|name| {
            name.chars()
                .map(|c| match c {
                    '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$'
                    | '\\' => format!("\\{c}"),
                    c => c.to_string(),
                })
                .collect()
        })
        .collect();
    format!("^({})$", escaped.join("|"))
}
