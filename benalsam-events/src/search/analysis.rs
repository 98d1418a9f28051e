//! What an engine without the `analysis-common` module answers when an index needs it, turned
//! into an error that names the module.
//!
//! The Turkish analysis of the library's `benalsam_turkish` analyzer (the `apostrophe`,
//! `stop` and `stemmer` filters, `lowercase` with a language) and every language analyzer
//! (`turkish`, `english`, …) live in that module. Every standard Elasticsearch and OpenSearch
//! distribution ships it; trimmed ones (Elasticsearch's integration-test zip) do not, and
//! their answer (`Unknown filter type [stemmer] for [benalsam_turkish_stemmer]`, `analyzer
//! [turkish] has not been configured in mappings`) does not say what is missing. Elasticsearch
//! 8.19, 9.2 and OpenSearch 2.19 answer alike (400, `illegal_argument_exception` or
//! `mapper_parsing_exception` with the reason above).

use serde_json::Value;

use crate::error::Error;

/// Analyzers, token filters, tokenizers and character filters of the `analysis-common`
/// module, as far as an event type is likely to name them. A name outside the list (a typo)
/// keeps the engine's own answer.
const ANALYSIS_COMMON: &[&str] = &[
    // language analyzers
    "arabic",
    "armenian",
    "basque",
    "bengali",
    "brazilian",
    "bulgarian",
    "catalan",
    "cjk",
    "czech",
    "danish",
    "dutch",
    "english",
    "estonian",
    "finnish",
    "french",
    "galician",
    "german",
    "greek",
    "hindi",
    "hungarian",
    "indonesian",
    "irish",
    "italian",
    "latvian",
    "lithuanian",
    "norwegian",
    "persian",
    "portuguese",
    "romanian",
    "russian",
    "serbian",
    "sorani",
    "spanish",
    "swedish",
    "thai",
    "turkish",
    "snowball",
    "pattern",
    "fingerprint",
    // token filters
    "apostrophe",
    "asciifolding",
    "cjk_bigram",
    "cjk_width",
    "classic",
    "common_grams",
    "decimal_digit",
    "delimited_payload",
    "dictionary_decompounder",
    "edge_ngram",
    "elision",
    "flatten_graph",
    "hyphenation_decompounder",
    "keep",
    "keep_types",
    "keyword_marker",
    "kstem",
    "length",
    "limit",
    "min_hash",
    "multiplexer",
    "ngram",
    "pattern_capture",
    "pattern_replace",
    "porter_stem",
    "predicate_token_filter",
    "remove_duplicates",
    "reverse",
    "snowball",
    "stemmer",
    "stemmer_override",
    "stop",
    "synonym",
    "synonym_graph",
    "trim",
    "truncate",
    "unique",
    "uppercase",
    "word_delimiter",
    "word_delimiter_graph",
    // tokenizers and character filters
    "char_group",
    "edge_ngram",
    "keyword",
    "letter",
    "lowercase",
    "path_hierarchy",
    "simple_pattern",
    "simple_pattern_split",
    "thai",
    "uax_url_email",
    "whitespace",
    "html_strip",
    "mapping",
];

/// The error for an index creation refused because the engine lacks the `analysis-common`
/// module, or `None` when the answer says something else. `body` is the index body sent (its
/// `settings.analysis` names the custom analyzer that needed the missing piece).
pub(crate) fn missing_module(
    index: &str,
    body: &Value,
    status: u16,
    answer: &Value,
) -> Option<Error> {
    if status != 400 {
        return None;
    }
    let reason = reasons(&answer["error"]).into_iter().find_map(|reason| {
        let missing = unknown_component(reason)?;
        ANALYSIS_COMMON
            .contains(&missing.1)
            .then(|| (reason.to_owned(), missing))
    })?;
    let (reason, (kind, name)) = reason;
    let analyzer = if kind == Component::Analyzer {
        name.to_owned()
    } else {
        analyzer_using(body, name).unwrap_or_else(|| name.to_owned())
    };
    Some(Error::config(
        format!("the analyzers of index {index}"),
        format!(
            "the `{analyzer}` analyzer needs the analysis-common module, which every standard \
             Elasticsearch/OpenSearch distribution ships; this search engine lacks it (it \
             answered: {reason}). Run a distribution with the module (the default \
             Elasticsearch or OpenSearch download, image or cloud service), or give the event \
             type's text fields a built-in analyzer such as `standard`"
        ),
    ))
}

#[derive(Debug, PartialEq, Eq)]
enum Component {
    Analyzer,
    Other,
}

/// Every `reason` of an error object, its causes and root causes.
fn reasons(error: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(reason) = error["reason"].as_str() {
        out.push(reason);
    }
    if let Some(roots) = error["root_cause"].as_array() {
        out.extend(roots.iter().filter_map(|r| r["reason"].as_str()));
    }
    if error["caused_by"].is_object() {
        out.extend(reasons(&error["caused_by"]));
    }
    out
}

/// The analysis component a reason says is unknown: `Unknown filter type [stemmer] for [..]`,
/// `analyzer [turkish] has not been configured in mappings`, `failed to find global analyzer
/// [turkish]`, `failed to find analyzer type [turkish] or tokenizer for [..]`.
fn unknown_component(reason: &str) -> Option<(Component, &str)> {
    let bracketed = |after: &str| -> Option<&str> {
        let start = reason.find(after)? + after.len();
        let rest = reason[start..].strip_prefix('[')?;
        rest.split_once(']').map(|(name, _)| name)
    };
    for prefix in [
        "Unknown filter type ",
        "Unknown tokenizer type ",
        "Unknown char_filter type ",
        "Unknown char filter type ",
    ] {
        if let Some(name) = bracketed(prefix) {
            return Some((Component::Other, name));
        }
    }
    for prefix in [
        "failed to find global analyzer ",
        "failed to find analyzer type ",
        "analyzer ",
    ] {
        if let Some(name) = bracketed(prefix)
            && (prefix != "analyzer " || reason.contains("has not been configured"))
        {
            return Some((Component::Analyzer, name));
        }
    }
    None
}

/// The custom analyzer of `body` whose filters, tokenizer or char filters are (or are defined
/// as) `component`.
fn analyzer_using(body: &Value, component: &str) -> Option<String> {
    let analysis = &body["settings"]["analysis"];
    let is = |section: &str, name: &str| {
        name == component || analysis[section][name]["type"].as_str() == Some(component)
    };
    analysis["analyzer"]
        .as_object()?
        .iter()
        .find_map(|(name, analyzer)| {
            let names = |key: &str| -> Vec<String> {
                match &analyzer[key] {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(items) => items
                        .iter()
                        .filter_map(|i| i.as_str().map(str::to_owned))
                        .collect(),
                    _ => Vec::new(),
                }
            };
            let uses = names("filter").iter().any(|f| is("filter", f))
                || names("tokenizer").iter().any(|t| is("tokenizer", t))
                || names("char_filter").iter().any(|c| is("char_filter", c));
            uses.then(|| name.clone())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unknown_stemmer_names_the_turkish_analyzer_and_the_module() {
        let body = crate::event_type::EventType::listings().index_body();
        // Elasticsearch 8.19's and 9.2's answer, word for word.
        let answer = json!({"error": {
            "root_cause": [{"type": "illegal_argument_exception",
                "reason": "Unknown filter type [stemmer] for [benalsam_turkish_stemmer]"}],
            "type": "illegal_argument_exception",
            "reason": "Unknown filter type [stemmer] for [benalsam_turkish_stemmer]"}, "status": 400});
        let error = missing_module("listings_v1", &body, 400, &answer).expect("recognized");
        assert!(error.is_config());
        let text = error.to_string();
        assert!(
            text.contains(
                "the `benalsam_turkish` analyzer needs the analysis-common module, which every \
                 standard Elasticsearch/OpenSearch distribution ships"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_language_analyzer_is_named_itself() {
        let answer = json!({"error": {"type": "mapper_parsing_exception",
            "reason": "Failed to parse mapping: analyzer [turkish] has not been configured in mappings",
            "caused_by": {"type": "illegal_argument_exception",
                "reason": "analyzer [turkish] has not been configured in mappings"}}, "status": 400});
        let error = missing_module("t_v1", &json!({}), 400, &answer).expect("recognized");
        assert!(
            error.to_string().contains("the `turkish` analyzer needs"),
            "{error}"
        );
    }

    #[test]
    fn a_misspelled_analyzer_or_another_refusal_keeps_the_engines_answer() {
        let typo = json!({"error": {"type": "mapper_parsing_exception",
            "reason": "Failed to parse mapping: analyzer [turksh] has not been configured in mappings"}});
        assert!(missing_module("t_v1", &json!({}), 400, &typo).is_none());
        let other = json!({"error": {"type": "resource_already_exists_exception", "reason": "index [t_v1] already exists"}});
        assert!(missing_module("t_v1", &json!({}), 400, &other).is_none());
        let busy = json!({"error": {"reason": "Unknown filter type [stemmer] for [x]"}});
        assert!(missing_module("t_v1", &json!({}), 429, &busy).is_none());
    }
}
