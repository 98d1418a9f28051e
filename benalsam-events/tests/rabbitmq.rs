//! Checks a publish with confirms and a consume against a real RabbitMQ (scripts/stack up).

mod support;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use support::{rabbitmq_url, unique_name};

#[tokio::test]
async fn a_confirmed_message_comes_back_from_a_queue() {
    let url = rabbitmq_url();
    let connection = Connection::connect(url.expose(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ answers");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    let queue = unique_name("test.roundtrip");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare queue");

    let body = br#"{"messageId":"job_1"}"#;
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default()
                .with_message_id("job_1".into())
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "broker acked the publish: {confirm:?}");
    assert!(confirm.take_message().is_none(), "the message was routed");

    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(std::time::Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("consumer open")
        .expect("delivery");
    assert_eq!(delivery.data, body);
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("job_1")
    );
    delivery.ack(BasicAckOptions::default()).await.expect("ack");

    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete queue");
    connection.close(200, "done".into()).await.expect("close");
}
