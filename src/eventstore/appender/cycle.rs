//! One cycle under the lease: check each append against its stream's head, give positions,
//! journal the cycle, answer (see the parent module for the whole protocol).

use super::*;

impl Appender {
    /// Waits while too many journaled events wait for ClickHouse.
    async fn room(&self, t: &Tenure) -> Result<(), EventStoreError> {
        let floor = t.next as i64 - 1 - MAX_UNFLUSHED as i64;
        let mut last = self.last.subscribe();
        let caught_up = matches!(tokio::time::timeout(WRITE_TIMEOUT, last.wait_for(|&p| p >= floor)).await, Ok(Ok(_)));
        match caught_up {
            true => Ok(()),
            false => Err(EventStoreError::Unavailable(format!(
                "ClickHouse is more than {MAX_UNFLUSHED} events behind the journal; retry later"
            ))),
        }
    }

    /// Commits one batch of appends under the lease.
    pub(super) async fn cycle(&mut self, t: &mut Tenure, batch: Vec<Request>) -> Outcome {
        if t.heads.len() > HEADS_KEPT && self.drain(t, DRAIN).await {
            t.heads.clear();
        }
        if let Err(e) = self.load_heads(t, &batch).await {
            answer_all(batch, &e);
            return Outcome::Keep;
        }
        let now = DateTime::now().timestamp_millis();
        let mut next = t.next;
        let mut heads: HashMap<String, Head> = HashMap::new();
        let mut rows = Vec::new();
        let mut answers = Vec::new();
        for r in batch {
            let Some(head) = heads.get(&r.stream).or_else(|| t.heads.get(&r.stream)).cloned() else {
                // `load_heads` loads every stream of the batch; answer rather than panic.
                let e =
                    EventStoreError::Unavailable(format!("the head of stream '{}' was not loaded; retry", r.stream));
                answers.push(Answer { reply: r.reply, result: Err(e), accepted: false });
                continue;
            };
            if let Some(done) = r.client_ids.then(|| head.retry_of(&r.events)).flatten() {
                answers.push(Answer { reply: r.reply, result: Ok(done), accepted: false });
                continue;
            }
            if !r.expected.admits(head.version) {
                let e = EventStoreError::WrongExpectedVersion {
                    stream: r.stream.clone(),
                    expected: r.expected,
                    actual: head.version,
                };
                answers.push(Answer { reply: r.reply, result: Err(e), accepted: false });
                continue;
            }
            let k = r.events.len() as i64;
            let mut tail = Vec::with_capacity(r.events.len());
            for (i, e) in r.events.into_iter().enumerate() {
                let (version, position) = (head.version + 1 + i as i64, next + i as u64);
                // `append` gives every event an id before it queues; a new one is as good.
                let id = e.event_id.unwrap_or_else(Uuid::new_v4);
                tail.push((id, version, position as i64));
                rows.push(EventRow {
                    position,
                    stream_id: r.stream.clone(),
                    stream_version: version as u64,
                    event_id: id,
                    event_type: e.event_type,
                    data: e.data,
                    metadata: e.metadata.into_iter().collect(),
                    timestamp: now,
                });
            }
            let result = AppendResult {
                next_expected_version: (head.version + k) as u64,
                first_position: next,
                position: next + k as u64 - 1,
            };
            heads.insert(r.stream.clone(), head.after(tail));
            answers.push(Answer { reply: r.reply, result: Ok(result), accepted: true });
            next += k as u64;
        }
        if rows.is_empty() {
            answer(answers);
            return Outcome::Keep;
        }
        if std::mem::take(&mut self.stalls.before_write) {
            tokio::time::sleep(self.faults.before_write).await;
        }
        if let Err(e) = self.room(t).await {
            fail(answers, &e);
            return Outcome::Keep;
        }
        let entry = Entry { first: t.next, rows: Arc::new(rows) };
        let written = match t.check(WRITE_TIMEOUT) {
            Err(e) => Err(Some(e)),
            Ok(()) => match tokio::time::timeout(WRITE_TIMEOUT, self.journal.write(&entry, &t.id)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(WriteError::Taken)) => {
                    tracing::warn!(
                        position = t.next,
                        "another appender journaled these positions; taking the lease afresh"
                    );
                    let e = EventStoreError::Unavailable("another appender took over the log; retry".into());
                    fail(answers, &e);
                    return Outcome::Release;
                }
                Ok(Err(WriteError::Unknown(e))) => {
                    tracing::warn!(error = %e, "journal write outcome unknown");
                    Err(None)
                }
                Err(_) => Err(None),
            },
        };
        match written {
            Ok(()) => {}
            Err(Some(refused)) => {
                fail(answers, &refused);
                return Outcome::Keep;
            }
            Err(None) => {
                let e = EventStoreError::Unavailable(
                    "the events may or may not have been stored; retry with the same event ids".into(),
                );
                fail(answers, &e);
                return Outcome::Abandon;
            }
        }
        if std::mem::take(&mut self.stalls.after_write) {
            tokio::time::sleep(self.faults.after_write).await;
        }
        t.next = next;
        t.heads.extend(heads);
        self.recent.push(entry.clone());
        let _ = t.flusher.send(entry);
        answer(answers);
        Outcome::Keep
    }

    /// Reads from ClickHouse the heads of the batch's streams this lease does not know
    /// yet, with as many last events as the longest possible retry needs.
    async fn load_heads(&self, t: &mut Tenure, batch: &[Request]) -> Result<(), EventStoreError> {
        let mut need_tail: HashMap<&str, usize> = HashMap::new();
        let mut missing: HashSet<&str> = HashSet::new();
        for r in batch {
            match t.heads.get(&r.stream) {
                None => {
                    missing.insert(&r.stream);
                }
                Some(h) if r.client_ids && !h.can_check(r.events.len()) => {
                    missing.insert(&r.stream);
                }
                Some(_) => {}
            }
            if r.client_ids {
                let n = need_tail.entry(&r.stream).or_default();
                *n = (*n).max(r.events.len());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        // A stream this tenure wrote may have events ClickHouse does not hold yet.
        if missing.iter().any(|s| t.heads.contains_key(*s)) && !self.drain(t, DRAIN).await {
            return Err(EventStoreError::Unavailable("ClickHouse is behind the journal; retry".into()));
        }
        t.check(Duration::from_secs(1))?;
        let ids: Vec<&str> = missing.iter().copied().collect();
        let versions: Vec<(String, u64)> = self
            .ch
            .query(
                "SELECT stream_id, max(stream_version) FROM EventStore_Events \
                 WHERE stream_id IN {s:Array(String)} GROUP BY stream_id",
            )
            .param("s", &ids)
            .fetch_all()
            .await?;
        let versions: HashMap<String, i64> = versions.into_iter().map(|(s, v)| (s, v as i64)).collect();
        for s in missing {
            let version = versions.get(s).copied().unwrap_or(-1);
            let tail = match need_tail.get(s) {
                Some(&n) if version >= 0 => Some(self.tail(s, n).await?),
                Some(_) => Some(Vec::new()),
                None => None,
            };
            t.heads.insert(s.to_string(), Head { version, tail });
        }
        Ok(())
    }

    /// A stream's last `n` events (id, version, position), oldest first.
    async fn tail(&self, stream: &str, n: usize) -> Result<Vec<(Uuid, i64, i64)>, EventStoreError> {
        let rows: Vec<(String, u64, u64)> = self
            .ch
            .query(
                "SELECT toString(event_id), stream_version, position FROM EventStore_Events \
                 WHERE stream_id = {s:String} ORDER BY stream_version DESC LIMIT 1 BY stream_version LIMIT {n:UInt64}",
            )
            .param("s", stream)
            .param("n", n as u64)
            .fetch_all()
            .await?;
        Ok(rows.into_iter().rev().filter_map(|(id, v, p)| Some((id.parse().ok()?, v as i64, p as i64))).collect())
    }
}

/// An append's answer once the cycle ends; `accepted` when it depends on the cycle's
/// insert (conflicts and retries of an earlier append do not).
struct Answer {
    reply: oneshot::Sender<Result<AppendResult, EventStoreError>>,
    result: Result<AppendResult, EventStoreError>,
    accepted: bool,
}

fn answer(answers: Vec<Answer>) {
    for a in answers {
        let _ = a.reply.send(a.result);
    }
}

/// Answers every accepted append with `e`; the others keep their own answer.
fn fail(answers: Vec<Answer>, e: &EventStoreError) {
    for a in answers {
        let _ = a.reply.send(match a.accepted {
            true => Err(again(e)),
            false => a.result,
        });
    }
}
