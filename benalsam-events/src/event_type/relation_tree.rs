//! Relations of relations: a related row's own related rows (a listing → its seller → the
//! seller's city), and links through a join table (a listing's tags through `listing_tags`).
//!
//! A relation may hold relations of its own, to any depth up to [`MAX_DEPTH`]. Each one is a
//! relation like the top-level ones, joined to the rows of the relation above it rather than
//! to the document's row; the document carries it inside the object of the row above
//! (`seller.city.name`). Every relation of the tree has its own trigger and records its own
//! jobs, `<table>#<path>` (`listings#seller.city`); the fan-out of such a job finds the
//! documents that contain the changed row by joining back along the path
//! (`relations/sql.rs`).
//!
//! A *through* relation is a children relation on a join table whose rows are each replaced
//! by the object of their one parent relation: `tags` on `listing_tags` through its parent
//! `tag` on `tags` gives `tags: [{name: …}, …]`, not `[{tag: {name: …}}]`. Adding or
//! removing a link is a change of the join table (one document); a tag rename is a change of
//! the parent, fanned out to every document that links it.

use super::Relation;

/// The most levels of relations a document may have (a listing → seller → city → country is
/// three): each level is one more subquery in every read of the document and one more join
/// in the fan-out of a change below it.
pub(crate) const MAX_DEPTH: usize = 4;

impl Relation {
    /// Adds a relation of the related rows: joined to this relation's rows (its
    /// `foreign_key`/`references` name this relation's table where the top level names the
    /// document's), its fields an object (or array) inside each of this relation's objects.
    ///
    /// ```
    /// use benalsam_events::EventType;
    /// use benalsam_events::event_type::{FieldType, Relation};
    ///
    /// let keyword = || FieldType::Keyword { normalizer: None, indexed: true };
    /// let listings = EventType::listings().with_relation(
    ///     Relation::parent("seller", "users", &["user_id"], &["id"])
    ///         .field("display_name", keyword())
    ///         .relation(
    ///             Relation::parent("city", "cities", &["city_id"], &["id"])
    ///                 .field("name", keyword())
    ///                 .relation(
    ///                     Relation::parent("country", "countries", &["country_id"], &["id"])
    ///                         .field("code", keyword()),
    ///                 ),
    ///         ),
    /// );
    /// assert!(listings.validate().is_ok());
    /// ```
    pub fn relation(mut self, mut relation: Relation) -> Self {
        let mut above = self.above.clone();
        above.push(self.name.clone());
        relation.place_below(above);
        self.relations.push(relation);
        self
    }

    /// Makes these children the links of a many-to-many relation: each row (of the join
    /// table) is replaced by the object of `target`, a parent relation of the join table.
    ///
    /// ```
    /// use benalsam_events::EventType;
    /// use benalsam_events::event_type::{FieldType, Relation};
    ///
    /// let keyword = FieldType::Keyword { normalizer: None, indexed: true };
    /// let listings = EventType::listings().with_relation(
    ///     Relation::children("tags", "listing_tags", &["listing_id"], &["id"])
    ///         .key("tag_id")
    ///         .limit(20)
    ///         .through(Relation::parent("tag", "tags", &["tag_id"], &["id"]).field("name", keyword)),
    /// );
    /// assert!(listings.validate().is_ok());
    /// ```
    pub fn through(mut self, target: Relation) -> Self {
        self.through = true;
        self.relation(target)
    }

    /// The related table's key (its jobs' record id; default `id`): a join table without an
    /// `id` names one of its columns (never NULL).
    pub fn key(mut self, column: &str) -> Self {
        column.clone_into(&mut self.key);
        self
    }

    /// Sets the names of the relations above it, and below it in turn.
    fn place_below(&mut self, above: Vec<String>) {
        let mut mine = above.clone();
        mine.push(self.name.clone());
        for relation in &mut self.relations {
            relation.place_below(mine.clone());
        }
        self.above = above;
    }

    /// Its path from the document: `seller.city`, or `seller` at the top level.
    pub(crate) fn path_name(&self) -> String {
        let mut names = self.above.clone();
        names.push(self.name.clone());
        names.join(".")
    }

    /// Its level: 1 for a relation of the document, 2 for a relation of one of those, ….
    pub(crate) fn depth(&self) -> usize {
        self.above.len() + 1
    }
}

/// Every relation of the tree with the relations above it, depth first: each chain starts
/// at a relation of the document and ends with the relation it is about.
pub(crate) fn chains(relations: &[Relation]) -> Vec<Vec<&Relation>> {
    fn walk<'a>(relation: &'a Relation, above: &[&'a Relation], out: &mut Vec<Vec<&'a Relation>>) {
        let mut chain = above.to_vec();
        chain.push(relation);
        out.push(chain.clone());
        for below in &relation.relations {
            walk(below, &chain, out);
        }
    }
    let mut out = Vec::new();
    for relation in relations {
        walk(relation, &[], &mut out);
    }
    out
}

/// `benalsam_<event type>_<relation>` (`benalsam_listings_seller.city` below the top: the dot
/// keeps it apart from a relation `seller_city`), validated to fit PostgreSQL's 63 bytes.
pub(crate) fn relation_trigger_name(
    event_type: &crate::event_type::EventType,
    relation: &Relation,
) -> String {
    format!("benalsam_{}_{}", event_type.name, relation.path_name())
}

/// `truncate_<event type>_<relation>`: the statement trigger that follows a TRUNCATE of the
/// related table. As long as [`relation_trigger_name`], so the same check bounds it.
pub(crate) fn relation_truncate_trigger_name(
    event_type: &crate::event_type::EventType,
    relation: &Relation,
) -> String {
    format!("truncate_{}_{}", event_type.name, relation.path_name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_type::FieldType;

    fn tree() -> Relation {
        Relation::parent("seller", "users", &["user_id"], &["id"])
            .field("name", FieldType::Long)
            .relation(
                Relation::parent("city", "cities", &["city_id"], &["id"])
                    .field("name", FieldType::Long)
                    .relation(
                        Relation::parent("country", "countries", &["country_id"], &["id"])
                            .field("code", FieldType::Long),
                    ),
            )
            .relation(Relation::children("shops", "shops", &["owner_id"], &["id"]))
    }

    #[test]
    fn every_relation_of_the_tree_knows_its_path_whatever_the_order_it_was_built_in() {
        let seller = tree();
        let all = [seller];
        let paths: Vec<String> = chains(&all)
            .iter()
            .map(|chain| {
                let names: Vec<&str> = chain.iter().map(|r| r.name.as_str()).collect();
                assert_eq!(chain.last().map(|r| r.path_name()), Some(names.join(".")));
                names.join(".")
            })
            .collect();
        assert_eq!(
            paths,
            [
                "seller",
                "seller.city",
                "seller.city.country",
                "seller.shops"
            ]
        );
        let country = &all[0].relations[0].relations[0];
        assert_eq!(country.depth(), 3);
        assert_eq!(
            country.job_table("listings"),
            "listings#seller.city.country"
        );
        assert_eq!(all[0].job_table("listings"), "listings#seller");
    }

    const JOBS: &str = include_str!("../../../examples/joined_documents/jobs.toml");

    #[test]
    fn the_jobs_example_nests_three_levels_and_links_tags_through_a_join_table() {
        let types = crate::event_type::file::parse(JOBS, "jobs.toml").expect("valid");
        let jobs = &types[0];
        let tables: Vec<String> = chains(&jobs.relations)
            .iter()
            .filter_map(|chain| chain.last().map(|r| r.job_table(&jobs.table)))
            .collect();
        assert_eq!(
            tables,
            [
                "job_posts#company",
                "job_posts#company.industry",
                "job_posts#company.industry.sector",
                "job_posts#last_applied_at",
                "job_posts#open_applications",
                "job_posts#tags",
                "job_posts#tags.tag",
            ]
        );
        let company = &jobs.relations[0];
        let industry = &company.relations[0];
        // A change of the column a relation below joins on is a change of the document.
        assert_eq!(company.columns(), ["id", "industry_id", "name"]);
        assert_eq!(industry.columns(), ["id", "name", "sector_id"]);
        assert_eq!(
            crate::event_type::relation_trigger_name(jobs, &industry.relations[0]),
            "benalsam_jobs_company.industry.sector"
        );
        let tags = &jobs.relations[3];
        assert!(tags.through);
        assert_eq!(tags.columns(), ["position", "post_id", "tag_id"]);
        let body = jobs.index_body();
        let p = &body["mappings"]["properties"];
        assert_eq!(
            p["company"]["properties"]["industry"]["properties"]["sector"]["properties"]["name"]["type"],
            "keyword"
        );
        assert_eq!(p["company"]["properties"]["name"]["copy_to"], "search_text");
        assert_eq!(
            p["tags"]["properties"]["name"]["type"], "keyword",
            "a tag's fields are the element's own, not under `tag`"
        );
        assert!(p["tags"]["properties"].get("tag").is_none());
        assert_eq!(p["open_applications"]["type"], "long");
        assert_eq!(p["last_applied_at"]["type"], "date");
        let open = &jobs.relations[2];
        assert_eq!(open.columns(), ["id", "post_id", "status"]);
    }

    #[test]
    fn values_nest_and_links_take_their_target_s_object() {
        use serde_json::json;
        let types = crate::event_type::file::parse(JOBS, "jobs.toml").expect("valid");
        let (company, tags) = (&types[0].relations[0], &types[0].relations[3]);
        let read = json!({"id": 1, "name": "Acme", "industry_id": 3,
            "#industry": {"id": 3, "name": "Robots", "sector_id": 9,
                          "#sector": {"id": 9, "name": "Industry"}}});
        assert_eq!(
            company.value(&read).expect("valid"),
            Some(
                json!({"name": "Acme", "industry": {"name": "Robots", "sector": {"name": "Industry"}}})
            )
        );
        let no_sector = json!({"name": "Acme", "#industry": {"name": "Robots", "#sector": null}});
        assert_eq!(
            company.value(&no_sector).expect("valid"),
            Some(json!({"name": "Acme", "industry": {"name": "Robots"}}))
        );
        let links = json!([
            {"tag_id": 2, "#tag": {"id": 2, "name": "rust"}},
            {"tag_id": 5, "#tag": null},
            {"tag_id": 1, "#tag": {"id": 1, "name": "remote"}}
        ]);
        assert_eq!(
            tags.value(&links).expect("valid"),
            Some(json!([{"name": "rust"}, {"name": "remote"}])),
            "flattened, in the join table's order, a dangling link left out"
        );
        let wrong = json!({"name": "Acme", "#industry": {"name": "Robots", "#sector": [1]}});
        let err = company.value(&wrong).expect_err("not an object");
        assert!(err.contains("industry: sector"), "{err}");
    }

    #[test]
    fn mistakes_in_a_tree_are_named_by_their_path() {
        let five = Relation::parent("a", "t1", &["x"], &["id"]).relation(
            Relation::parent("b", "t2", &["x"], &["id"]).relation(
                Relation::parent("c", "t3", &["x"], &["id"]).relation(
                    Relation::parent("d", "t4", &["x"], &["id"]).relation(
                        Relation::parent("e", "t5", &["x"], &["id"]).field("n", FieldType::Long),
                    ),
                ),
            ),
        );
        let err = five
            .validate("listings", &[])
            .expect_err("too deep")
            .to_string();
        assert!(
            err.contains(
                "relations.a.relations.b.relations.c.relations.d.relations.e.relations: is level 5"
            ) && err.contains("at most 4 levels"),
            "{err}"
        );
        let clash = Relation::parent("seller", "users", &["user_id"], &["id"])
            .field("city", FieldType::Long)
            .relation(
                Relation::parent("city", "cities", &["city_id"], &["id"])
                    .field("n", FieldType::Long),
            );
        let err = clash
            .validate("listings", &[])
            .expect_err("a clash")
            .to_string();
        assert!(
            err.contains("relations.seller.relations.city.name")
                && err.contains("the relation above already has a field \"city\""),
            "{err}"
        );
        let tag =
            || Relation::parent("tag", "tags", &["tag_id"], &["id"]).field("n", FieldType::Long);
        let links = || Relation::children("tags", "listing_tags", &["listing_id"], &["id"]);
        assert!(links().through(tag()).validate("listings", &[]).is_ok());
        for (bad, why) in [
            (
                links().field("x", FieldType::Long).through(tag()),
                "not from the join table",
            ),
            (
                links().through(tag()).relation(tag()),
                "exactly one relation",
            ),
            (
                links().through(
                    Relation::children("tag", "tags", &["x"], &["id"]).field("n", FieldType::Long),
                ),
                "exactly one relation, a parent",
            ),
            (
                Relation::parent("tags", "t", &["x"], &["id"]).through(tag()),
                "through applies to kind = \"children\"",
            ),
        ] {
            let err = bad.validate("listings", &[]).expect_err(why).to_string();
            assert!(
                err.contains(why) && err.contains("relations.tags.through"),
                "{err}"
            );
        }
        let nested = Relation::children("photos", "images", &["listing_id"], &["id"])
            .nested(true)
            .relation(
                Relation::parent("by", "users", &["user_id"], &["id"]).field(
                    "name",
                    FieldType::Text {
                        analyzer: "standard".into(),
                        raw: false,
                        copy_to: Some("all".into()),
                    },
                ),
            );
        let err = nested
            .validate("listings", &[])
            .expect_err("copy_to")
            .to_string();
        assert!(
            err.contains("relations.photos.relations.by.fields.name"),
            "{err}"
        );
        let long = crate::event_type::EventType::new("listings", "listings").with_relation(
            Relation::parent("seller_of_the_listing", "users", &["user_id"], &["id"]).relation(
                Relation::parent("city_of_the_seller_of_it", "cities", &["city_id"], &["id"])
                    .field("n", FieldType::Long),
            ),
        );
        let err = long
            .validate()
            .expect_err("a long trigger name")
            .to_string();
        assert!(err.contains("over PostgreSQL's 63 bytes"), "{err}");
    }

    #[test]
    fn a_mistake_in_a_nested_relation_of_the_file_names_its_line() {
        let text = JOBS.replace(
            "foreign_key = [\"sector_id\"]      # columns of industries",
            "foreign_key = [\"sector_id\", \"x\"]",
        );
        let err = crate::event_type::file::parse(&text, "jobs.toml")
            .expect_err("uneven")
            .to_string();
        let line = JOBS
            .lines()
            .position(|l| {
                l.starts_with("[event_type.relations.company.relations.industry.relations.sector]")
            })
            .map_or(0, |i| i + 1);
        assert!(
            err.contains(&format!("jobs.toml:{line}:"))
                && err
                    .contains("relations.company.relations.industry.relations.sector.foreign_key"),
            "{err}"
        );
        let text = JOBS.replace("through = true", "through = true\nnested = 3");
        assert!(crate::event_type::file::parse(&text, "jobs.toml").is_err());
    }

    /// A tree of relations from a list of (parent index, name) pairs: each relation is added
    /// below an earlier one (or at the top), at most `MAX_DEPTH` levels.
    fn grow(shape: &[(usize, u8)]) -> Vec<Relation> {
        // Built bottom-up: a relation is complete before it is added to its parent.
        let mut nodes: Vec<(Option<usize>, Relation)> = Vec::new();
        let mut depth: Vec<usize> = Vec::new();
        for (i, (parent, name)) in shape.iter().enumerate() {
            let parent = (i > 0)
                .then(|| parent % i)
                .filter(|p| depth[*p] < MAX_DEPTH);
            depth.push(parent.map_or(1, |p| depth[p] + 1));
            let relation = Relation::parent(&format!("r{i}_{name}"), "t", &["x"], &["id"])
                .field("n", FieldType::Long);
            nodes.push((parent, relation));
        }
        for i in (0..nodes.len()).rev() {
            if let Some(parent) = nodes[i].0 {
                let child = nodes[i].1.clone();
                let above = nodes[parent].1.clone();
                nodes[parent].1 = above.relation(child);
            }
        }
        nodes
            .into_iter()
            .filter(|(p, _)| p.is_none())
            .map(|(_, r)| r)
            .collect()
    }

    proptest::proptest! {
        /// Whatever the shape of the tree, every relation of it is one chain, ending with it,
        /// whose names are its path, and each job table is its own.
        #[test]
        fn every_relation_of_any_tree_is_one_chain(shape in proptest::collection::vec((0usize..50, 0u8..3), 1..25)) {
            let top = grow(&shape);
            let all = chains(&top);
            proptest::prop_assert_eq!(all.len(), shape.len());
            let mut tables = std::collections::BTreeSet::new();
            for chain in &all {
                let last = chain.last().copied();
                proptest::prop_assert!(last.is_some());
                let last = last.unwrap_or(&top[0]);
                let names: Vec<&str> = chain.iter().map(|r| r.name.as_str()).collect();
                proptest::prop_assert_eq!(last.path_name(), names.join("."));
                proptest::prop_assert_eq!(last.depth(), chain.len());
                proptest::prop_assert!(chain.len() <= MAX_DEPTH);
                for pair in chain.windows(2) {
                    proptest::prop_assert!(pair[0].relations.contains(pair[1]));
                }
                proptest::prop_assert!(tables.insert(last.job_table("d")));
            }
        }
    }
}
