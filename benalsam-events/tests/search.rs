//! Checks Turkish analysis, indexing and search against a real search node (scripts/stack up).

mod support;

use elasticsearch::http::transport::Transport;
use elasticsearch::indices::{IndicesCreateParts, IndicesDeleteParts};
use elasticsearch::params::Refresh;
use elasticsearch::{Elasticsearch, IndexParts, SearchParts};
use serde_json::{Value, json};
use support::{search_url, unique_name};

#[tokio::test]
async fn a_turkish_word_is_found_through_its_stem() {
    let url = search_url();
    let client = Elasticsearch::new(Transport::single_node(url.expose()).expect("transport"));
    let index = unique_name("test-search");

    let created = client
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(json!({
            "settings": {
                "number_of_shards": 1,
                "number_of_replicas": 0,
                "analysis": {
                    "filter": {
                        "tr_lowercase": { "type": "lowercase", "language": "turkish" },
                        "tr_stop": { "type": "stop", "stopwords": "_turkish_" },
                        "tr_stemmer": { "type": "stemmer", "language": "turkish" }
                    },
                    "analyzer": {
                        "tr_text": {
                            "type": "custom",
                            "tokenizer": "standard",
                            "filter": ["apostrophe", "tr_lowercase", "tr_stop", "tr_stemmer"]
                        }
                    }
                }
            },
            "mappings": {
                "properties": {
                    "title": { "type": "text", "analyzer": "tr_text" },
                    "location": { "type": "geo_point" }
                }
            }
        }))
        .send()
        .await
        .expect("search node answers");
    assert!(
        created.status_code().is_success(),
        "create index: {}",
        created.text().await.unwrap_or_default()
    );

    let indexed = client
        .index(IndexParts::IndexId(&index, "1"))
        .body(json!({ "title": "İkinci el kitaplar ve dergiler", "location": { "lat": 41.01, "lon": 28.97 } }))
        .refresh(Refresh::True)
        .send()
        .await
        .expect("index document");
    assert!(indexed.status_code().is_success());

    let found: Value = client
        .search(SearchParts::Index(&[&index]))
        .body(json!({ "query": { "match": { "title": "kitap" } } }))
        .send()
        .await
        .expect("search")
        .json()
        .await
        .expect("search answer is JSON");
    assert_eq!(found["hits"]["total"]["value"], 1, "{found}");
    assert_eq!(found["hits"]["hits"][0]["_id"], "1");

    let deleted = client
        .indices()
        .delete(IndicesDeleteParts::Index(&[&index]))
        .send()
        .await
        .expect("delete index");
    assert!(deleted.status_code().is_success());
}

#[tokio::test]
async fn an_index_with_a_conflicting_mapping_stops_start_up_naming_the_field() {
    use benalsam_events::search::{IndexConfig, ensure_index, listings_index_body};
    let url = search_url();
    let client =
        benalsam_events::search::client(&url, std::time::Duration::from_secs(10)).expect("client");
    let alias = unique_name("test-conflict");
    // Someone made the index by hand, with `status` as full text.
    let made = client
        .indices()
        .create(IndicesCreateParts::Index(&alias))
        .body(json!({"mappings": {"properties": {"status": {"type": "text"}}}}))
        .send()
        .await
        .expect("create");
    assert!(made.status_code().is_success());

    let config = IndexConfig {
        alias: alias.clone(),
        ..IndexConfig::default()
    };
    let err = ensure_index(&client, &config, &listings_index_body(&config))
        .await
        .expect_err("a conflicting mapping");
    let text = err.to_string();
    assert!(
        text.contains("field status") && text.contains("text") && text.contains("keyword"),
        "{text}"
    );
    assert!(!err.can_be_retried());

    // Bootstrapping twice over our own index is fine and adds nothing.
    let ours = IndexConfig {
        alias: unique_name("test-ours"),
        ..IndexConfig::default()
    };
    let body = listings_index_body(&ours);
    ensure_index(&client, &ours, &body).await.expect("created");
    let again = ensure_index(&client, &ours, &body).await.expect("existing");
    assert!(
        matches!(again, benalsam_events::search::Bootstrap::Existing { ref added, .. } if added.is_empty()),
        "{again:?}"
    );
    for index in [alias, format!("{}_v1", ours.alias)] {
        client
            .indices()
            .delete(IndicesDeleteParts::Index(&[&index]))
            .send()
            .await
            .expect("cleanup");
    }
}
