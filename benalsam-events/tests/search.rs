//! Checks the listings mapping (Turkish analysis, geo point) and the index bootstrap against a
//! real search node (scripts/stack up).

mod support;

use benalsam_events::elasticsearch::IndexParts;
use benalsam_events::elasticsearch::indices::{IndicesCreateParts, IndicesDeleteParts};
use benalsam_events::elasticsearch::params::Refresh;
use serde_json::json;
use support::{TestIndex, search_url, unique_name};

/// Needs the `analysis-common` module (the Turkish analysis): on an engine without it, the
/// product's mapping must be refused at start, naming the module, and leave no index behind.
#[tokio::test]
async fn the_listings_mapping_finds_a_turkish_word_through_its_stem() {
    if !support::has_analysis_common() {
        let client = search_url()
            .client(std::time::Duration::from_secs(30))
            .expect("client");
        let alias = unique_name("t-turkish");
        let mut listings = benalsam_events::EventType::listings();
        alias.clone_into(&mut listings.index.alias);
        let error = listings
            .ensure_index(&client)
            .await
            .expect_err("the Turkish analysis needs analysis-common");
        let text = error.to_string();
        assert!(error.is_config(), "{text}");
        assert!(
            text.contains(
                "the `benalsam_turkish` analyzer needs the analysis-common module, which every \
                 standard Elasticsearch/OpenSearch distribution ships"
            ),
            "{text}"
        );
        let exists = client
            .indices()
            .exists(benalsam_events::elasticsearch::indices::IndicesExistsParts::Index(&[&alias]))
            .send()
            .await
            .expect("answer");
        assert_eq!(exists.status_code().as_u16(), 404, "no index left behind");
        return;
    }
    // The product's own mapping, created by the library's bootstrap.
    let index = support::TestIndex::new().await;
    let document = json!({
        "id": "1", "title": "İkinci el kitaplar ve dergiler", "status": "active",
        "geo_location": { "lat": 41.01, "lon": 28.97 }
    });
    let indexed = index
        .client
        .index(IndexParts::IndexId(&index.alias, "1"))
        .body(document)
        .refresh(Refresh::True)
        .send()
        .await
        .expect("index document");
    assert!(
        indexed.status_code().is_success(),
        "{}",
        indexed.text().await.unwrap_or_default()
    );
    for query in ["kitap", "KİTAPLARI", "dergi"] {
        assert_eq!(
            index
                .search(json!({ "match": { "search_text": query } }))
                .await,
            vec!["1".to_owned()],
            "{query} finds the listing"
        );
    }
    assert!(
        index
            .search(json!({ "match": { "search_text": "ve" } }))
            .await
            .is_empty(),
        "a stop word finds nothing"
    );
    let near = json!({"bool": {"filter": {"geo_distance": {"distance": "5km", "geo_location": {"lat": 41.0, "lon": 28.97}}}}});
    assert_eq!(index.search(near).await, vec!["1".to_owned()]);
    index.drop().await;
}

#[tokio::test]
async fn an_index_with_a_conflicting_mapping_stops_start_up_naming_the_field() {
    let url = search_url();
    let client = url
        .client(std::time::Duration::from_secs(10))
        .expect("client");
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

    let err = TestIndex::listings(&alias)
        .ensure_index(&client)
        .await
        .expect_err("a conflicting mapping");
    let text = err.to_string();
    assert!(
        text.contains("field status") && text.contains("text") && text.contains("keyword"),
        "{text}"
    );
    assert!(err.is_conflict() && !err.is_retryable());

    // Bootstrapping twice over our own index is fine and adds nothing.
    let ours = TestIndex::listings(&unique_name("test-ours"));
    ours.ensure_index(&client).await.expect("created");
    let again = ours.ensure_index(&client).await.expect("existing");
    assert!(again.is_empty(), "{again:?}");
    for index in [alias, format!("{}_v1", ours.index.alias)] {
        client
            .indices()
            .delete(IndicesDeleteParts::Index(&[&index]))
            .send()
            .await
            .expect("cleanup");
    }
}

/// A builder of its own: the document is the row as it is.
#[derive(Debug)]
struct AsIs;

impl benalsam_events::DocumentBuilder for AsIs {
    fn build(
        &self,
        envelope: &benalsam_events::Envelope<'_>,
    ) -> Result<benalsam_events::Action, benalsam_events::BuildError> {
        Ok(benalsam_events::Action::Index {
            index: "unused".to_owned(),
            id: envelope.record_id.to_string(),
            document: envelope.change_data.as_ref().clone(),
        })
    }
}

#[tokio::test]
async fn every_index_the_library_creates_keeps_deletes_long_enough_whatever_builds_its_documents() {
    use benalsam_events::EventType;
    let client = search_url()
        .client(std::time::Duration::from_secs(10))
        .expect("client");
    let mut configured = EventType::new("notes", "notes");
    configured.index.alias = unique_name("test-notes");
    let mut custom =
        EventType::new("pages", "pages").with_builder(AsIs, json!({ "body": { "type": "text" } }));
    custom.index.alias = unique_name("test-pages");
    for event_type in [&configured, &custom] {
        event_type.ensure_index(&client).await.expect("created");
        let index = format!("{}_v1", event_type.index.alias);
        let settings = client
            .indices()
            .get_settings(
                benalsam_events::elasticsearch::indices::IndicesGetSettingsParts::Index(&[&index]),
            )
            .send()
            .await
            .expect("settings")
            .json::<serde_json::Value>()
            .await
            .expect("json");
        let gc = settings[&index]["settings"]["index"]["gc_deletes"].as_str();
        assert_eq!(gc, Some("3600s"), "{}: {settings}", event_type.name);
        let mapping = client
            .indices()
            .get_mapping(
                benalsam_events::elasticsearch::indices::IndicesGetMappingParts::Index(&[&index]),
            )
            .send()
            .await
            .expect("mapping")
            .json::<serde_json::Value>()
            .await
            .expect("json");
        assert_eq!(
            mapping[&index]["mappings"]["properties"]["job_id"]["type"], "long",
            "the version field is always mapped: {mapping}"
        );
        client
            .indices()
            .delete(IndicesDeleteParts::Index(&[&index]))
            .send()
            .await
            .expect("cleanup");
    }
}
