//! Searching current versions: a page of a filter in an order, and counting.

use super::*;

impl ResourceStore {
    /// Lists current, non-deleted resources.
    pub async fn search(
        &self,
        rt: &str,
        filter: Document,
        order: &Order,
        limit: i64,
    ) -> Result<Vec<Version>, StoreError> {
        let mut query = doc! { "deleted": false };
        query.extend(filter);
        let (sort, after) = match order {
            Order::Id { after } => (doc! { "_id": 1 }, after.as_ref().map(|a| doc! { "_id": { "$gt": a } })),
            Order::LastUpdated { descending, after } => {
                let dir = if *descending { -1 } else { 1 };
                let op = if *descending { "$lt" } else { "$gt" };
                let after = after.as_ref().map(|(t, id)| {
                    doc! { "$or": [
                        { "lastUpdated": { op: t } },
                        { "lastUpdated": t, "_id": { op: id } },
                    ] }
                });
                (doc! { "lastUpdated": dir, "_id": dir }, after)
            }
        };
        if let Some(after) = after {
            query = doc! { "$and": [query, after] };
        }
        let options = FindOptions::builder().sort(sort).limit(limit).build();
        let docs: Vec<Document> = self.current(rt).find(query).with_options(options).await?.try_collect().await?;
        docs.iter().map(|d| decode(d, None)).collect()
    }

    /// Counts current, non-deleted resources matching `filter`.
    pub async fn count(&self, rt: &str, filter: Document) -> Result<u64, StoreError> {
        let mut query = doc! { "deleted": false };
        query.extend(filter);
        Ok(self.current(rt).count_documents(query).await?)
    }
}

/// Fields a search never needs from a document.
fn search_projection() -> Document {
    doc! { "searchAdded": 0, "searchRemoved": 0, "searchChangedAt": 0, "outbox": 0, "versionLog": 0 }
}

impl ResourceStore {
    /// The documents of a type whose latest version may not be in the search index yet
    /// (`historyPending`; see `store`), with their keys; at most `limit`.
    pub async fn search_pending(&self, rt: &str, limit: i64) -> Result<Vec<Version>, StoreError> {
        let options = FindOptions::builder().projection(search_projection()).limit(limit).build();
        let docs: Vec<Document> =
            self.current(rt).find(doc! { "historyPending": true }).with_options(options).await?.try_collect().await?;
        docs.iter().map(|d| decode(d, None)).collect()
    }

    /// The current documents with these ids (any order; missing ones left out), without
    /// their search keys.
    pub async fn by_ids(&self, rt: &str, ids: &[String]) -> Result<Vec<Version>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut projection = search_projection();
        projection.insert("_s", 0);
        let options = FindOptions::builder().projection(projection).build();
        let docs: Vec<Document> =
            self.current(rt).find(doc! { "_id": { "$in": ids } }).with_options(options).await?.try_collect().await?;
        docs.iter().map(|d| decode(d, None)).collect()
    }
}
