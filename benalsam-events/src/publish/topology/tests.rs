use std::time::Duration;

use super::arguments::{DeadLetterStrategy, Overflow};
use super::declare::{current_queue_type, inequivalent_argument};
use super::*;

#[test]
fn the_document_s_names_and_bindings() {
    let t = Topology::benalsam(&TopologyConfig::default());
    let names: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "elasticsearch.sync",
            "elasticsearch.sync.dlq",
            "listing.status.changes",
            "system.health"
        ]
    );
    assert!(t.bindings.contains(&BindingDef {
        exchange: "benalsam.listings".into(),
        queue: "elasticsearch.sync".into(),
        routing_key: "listing.#".into()
    }));
    let sync = &t.queues[0].arguments;
    assert_eq!(
        sync.get("x-dead-letter-exchange"),
        Some(&Argument::Str("benalsam.dlx".into()))
    );
    assert!(
        !sync.contains_key("x-max-length"),
        "the sync queue is never bounded"
    );
}

fn quorum() -> TopologyConfig {
    TopologyConfig {
        queue_type: QueueType::Quorum,
        ..TopologyConfig::default()
    }
}

fn str_arg(q: &QueueDef, key: &str) -> Option<String> {
    match q.arguments.get(key) {
        Some(Argument::Str(s)) => Some(s.clone()),
        _ => None,
    }
}

#[test]
fn classic_queues_keep_exactly_the_arguments_they_always_had() {
    let t = Topology::benalsam(&TopologyConfig::default());
    let keys = |i: usize| t.queues[i].arguments.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(0), ["x-dead-letter-exchange", "x-queue-type"]);
    assert_eq!(keys(1), ["x-queue-type"]);
    assert_eq!(
        keys(2),
        [
            "x-max-length",
            "x-message-ttl",
            "x-overflow",
            "x-queue-type"
        ]
    );
}

#[test]
fn quorum_sync_queues_dead_letter_at_least_once_and_nothing_is_dead_lettered_by_count() {
    let t = Topology::benalsam(&quorum());
    let sync = &t.queues[0];
    assert_eq!(str_arg(sync, "x-queue-type").as_deref(), Some("quorum"));
    assert_eq!(
        str_arg(sync, "x-dead-letter-strategy").as_deref(),
        Some("at-least-once")
    );
    assert_eq!(
        str_arg(sync, "x-overflow").as_deref(),
        Some("reject-publish")
    );
    assert!(!sync.arguments.contains_key("x-max-length"));
    for q in &t.queues {
        assert_eq!(
            q.arguments.get("x-delivery-limit"),
            Some(&Argument::Int(i64::from(u32::MAX))),
            "{}",
            q.name
        );
    }
    let status = &t.queues[2];
    assert_eq!(str_arg(status, "x-overflow").as_deref(), Some("drop-head"));
    assert_eq!(
        status.arguments.get("x-max-length"),
        Some(&Argument::Int(100_000))
    );
}

#[test]
fn impossible_combinations_are_refused_with_the_reason() {
    let ok = QueueArguments::derive(
        &QueueRole::Consumed {
            dead_letter_exchange: "dlx".into(),
        },
        &quorum(),
    );
    assert!(ok.check("q").is_ok());
    let refused = |args: QueueArguments, says: &str| {
        let error = args.check("q").expect_err(says);
        assert!(error.is_config(), "{error}");
        let text = error.to_string();
        assert!(text.contains("queue q") && text.contains(says), "{text}");
    };
    let classic = QueueArguments {
        queue_type: QueueType::Classic,
        ..ok.clone()
    };
    refused(
        QueueArguments {
            dead_letter_strategy: None,
            ..classic.clone()
        },
        "x-delivery-limit applies to quorum queues only",
    );
    refused(
        QueueArguments {
            delivery_limit: None,
            ..classic
        },
        "x-dead-letter-strategy applies to quorum queues only",
    );
    refused(
        QueueArguments {
            overflow: Some(Overflow::RejectPublishDlx),
            dead_letter_strategy: Some(DeadLetterStrategy::AtMostOnce),
            ..ok.clone()
        },
        "reject-publish-dlx",
    );
    refused(
        QueueArguments {
            overflow: Some(Overflow::DropHead),
            ..ok.clone()
        },
        "needs x-overflow reject-publish",
    );
    refused(
        QueueArguments {
            dead_letter_exchange: None,
            ..ok.clone()
        },
        "needs a dead-letter exchange",
    );
    refused(
        QueueArguments {
            delivery_limit: Some(0),
            ..ok.clone()
        },
        "first return",
    );
    let config = TopologyConfig {
        delivery_limit: 0,
        ..quorum()
    };
    let error = Topology::benalsam(&config).validate().expect_err("limit 0");
    assert_eq!(error.setting(), Some("TopologyConfig::delivery_limit"));
    let config = TopologyConfig {
        status_queue_max_length: 0,
        ..TopologyConfig::default()
    };
    let error = config.validate().expect_err("no room");
    assert_eq!(
        error.setting(),
        Some("TopologyConfig::status_queue_max_length")
    );
}

#[test]
fn a_bad_queue_type_names_the_setting_and_the_choices() {
    let error = "lazy".parse::<QueueType>().expect_err("not a type");
    assert_eq!(error.setting(), Some("BENALSAM_QUEUE_TYPE"));
    let text = error.to_string();
    assert!(
        text.contains("\"classic\"") && text.contains("\"quorum\""),
        "{text}"
    );
    assert_eq!("quorum".parse::<QueueType>().ok(), Some(QueueType::Quorum));
}

#[test]
fn the_existing_type_is_read_from_the_broker_reply() {
    let reply = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q1' in vhost '/': received 'classic' but current is 'quorum'";
    assert_eq!(current_queue_type(reply), Some(QueueType::Quorum));
    let other = "PRECONDITION_FAILED - inequivalent arg 'x-overflow' for queue 'c1' in vhost '/': received the value 'reject-publish' of type 'longstr' but current is none";
    assert_eq!(current_queue_type(other), None);
}

/// Quorum-only arguments, classic-only arguments and values, and what quorum queues
/// refuse or ignore.
const QUORUM_ONLY: [&str; 3] = [
    "x-delivery-limit",
    "x-dead-letter-strategy",
    "x-quorum-initial-group-size",
];
const NEVER_ON_QUORUM: [&str; 4] = [
    "x-max-priority",
    "x-queue-mode",
    "x-queue-master-locator",
    "x-queue-version",
];

proptest::proptest! {
    #[test]
    fn every_derived_queue_is_valid_for_its_type(
        quorum in proptest::bool::ANY,
        status_max in 1u32..=u32::MAX,
        health_max in 1u32..=u32::MAX,
        ttl_ms in 1u64..=30 * 24 * 3600 * 1000,
        limit in 1u32..=u32::MAX,
        with_status in proptest::bool::ANY,
    ) {
        let config = TopologyConfig {
            queue_type: if quorum { QueueType::Quorum } else { QueueType::Classic },
            status_queue_max_length: status_max,
            health_queue_max_length: health_max,
            status_queue_ttl: Duration::from_millis(ttl_ms),
            delivery_limit: limit,
            ..TopologyConfig::default()
        };
        let mut items = EventType::new("inventory", "inventory_items");
        if !with_status {
            items.status_queue = None;
        }
        let t = Topology::for_event_types(&[EventType::listings(), items], &config);
        proptest::prop_assert!(t.validate().is_ok());
        for q in &t.queues {
            let wanted = config.queue_type.as_str().to_owned();
            proptest::prop_assert_eq!(str_arg(q, "x-queue-type"), Some(wanted));
            let overflow = str_arg(q, "x-overflow");
            if quorum {
                for key in NEVER_ON_QUORUM {
                    proptest::prop_assert!(!q.arguments.contains_key(key), "{} {}", q.name, key);
                }
                proptest::prop_assert_ne!(overflow.as_deref(), Some("reject-publish-dlx"));
                proptest::prop_assert_eq!(
                    q.arguments.get("x-delivery-limit"),
                    Some(&Argument::Int(i64::from(limit)))
                );
                if q.arguments.contains_key("x-dead-letter-exchange") {
                    let strategy = str_arg(q, "x-dead-letter-strategy");
                    proptest::prop_assert_eq!(strategy.as_deref(), Some("at-least-once"));
                    proptest::prop_assert_eq!(overflow.as_deref(), Some("reject-publish"));
                }
            } else {
                for key in QUORUM_ONLY {
                    proptest::prop_assert!(!q.arguments.contains_key(key), "{} {}", q.name, key);
                }
            }
            // A bounded queue keeps its bound and never refuses a publish.
            if q.arguments.contains_key("x-max-length") {
                proptest::prop_assert_eq!(overflow.as_deref(), Some("drop-head"));
                proptest::prop_assert!(q.arguments.contains_key("x-message-ttl"));
            }
        }
    }
}

#[test]
fn each_event_type_gets_its_own_queue_and_dead_letters() {
    let mut items = EventType::new("inventory", "inventory_items");
    items.routing_prefix = "inventory_item".into();
    let t = Topology::for_event_types(
        &[EventType::listings(), items.clone(), items],
        &TopologyConfig::default(),
    );
    let names: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "elasticsearch.sync",
            "elasticsearch.sync.dlq",
            "listing.status.changes",
            "inventory.sync",
            "inventory.sync.dlq",
            "system.health"
        ],
        "each entity once"
    );
    let inventory = &t.queues[3].arguments;
    assert_eq!(
        inventory.get("x-dead-letter-exchange"),
        Some(&Argument::Str("inventory.sync.dlx".into()))
    );
    let bound = |exchange: &str, queue: &str, key: &str| {
        t.bindings.contains(&BindingDef {
            exchange: exchange.into(),
            queue: queue.into(),
            routing_key: key.into(),
        })
    };
    assert!(bound(
        "benalsam.inventory",
        "inventory.sync",
        "inventory_item.#"
    ));
    assert!(bound("inventory.sync.dlx", "inventory.sync.dlq", "#"));
    assert!(bound("benalsam.dlx", "elasticsearch.sync.dlq", "#"));
    assert!(
        !bound("benalsam.dlx", "inventory.sync.dlq", "#"),
        "dead letters of one type never reach another's queue"
    );
}

#[test]
fn the_argument_is_read_from_the_broker_reply() {
    let reply = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'system.health' in vhost '/': received the value '5' of type 'signedint' but current is none";
    assert_eq!(
        inequivalent_argument(reply).as_deref(),
        Some("x-max-length")
    );
    assert_eq!(inequivalent_argument("PRECONDITION_FAILED - other"), None);
}
