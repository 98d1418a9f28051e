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
                assert_eq!(
                    chain.last().map(|r| r.path_name()),
                    Some(names.join("."))
                );
                names.join(".")
            })
            .collect();
        assert_eq!(
            paths,
            ["seller", "seller.city", "seller.city.country", "seller.shops"]
        );
        let country = &all[0].relations[0].relations[0];
        assert_eq!(country.depth(), 3);
        assert_eq!(country.job_table("listings"), "listings#seller.city.country");
        assert_eq!(all[0].job_table("listings"), "listings#seller");
    }
}
