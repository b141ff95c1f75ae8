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
