//! The events a plan produced, built on demand; and the validation of the members it adds
//! or changes.

use super::*;

/// The events of one write, built on demand a chunk at a time: a million-member batch
/// never exists as a million `MemberEvent`s.
pub struct Planned<'a> {
    pub(super) origin: Origin,
    pub(super) base_count: u64,
    pub(super) drafts: Vec<Draft<'a>>,
    /// Active members after the write; `None` when the membership was never enumerated.
    pub count: Option<u64>,
}

impl Planned<'_> {
    pub fn len(&self) -> usize {
        self.drafts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.drafts.is_empty()
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Active members before the write.
    pub fn base_count(&self) -> u64 {
        self.base_count
    }

    /// The events in order as `(type, position, text)`: text is the member's JSON, or the
    /// reference of a removed member (the outbox's compact form).
    pub fn rows(&self) -> impl Iterator<Item = (EventType, u64, &str)> + '_ {
        self.drafts.iter().map(|d| {
            let text = match d.event_type {
                EventType::Removed => d.member.reference.as_str(),
                _ => d.member.json.as_str(),
            };
            (d.event_type, d.position, text)
        })
    }

    /// `(type, reference)` of each event, for the member index.
    pub fn changes(&self) -> impl Iterator<Item = (EventType, &str)> + '_ {
        self.drafts.iter().map(|d| (d.event_type, d.member.reference.as_str()))
    }
}

/// Validates members as elements of an R4 Group (one parse for all of them).
pub(super) fn validate_members(members: &[(usize, Value)]) -> Result<(), FhirError> {
    if members.is_empty() {
        return Ok(());
    }
    let group = group_of(members.iter().map(|(_, m)| m.clone()).collect());
    validate_resource("Group", &group).map_err(|e| {
        let mut e = FhirError::from(e);
        // "Group.member[k]…" → the operation that brought member k.
        if let Some(expr) = &e.expression {
            if let Some(k) = expr
                .strip_prefix("Group.member[")
                .and_then(|r| r.split(']').next())
                .and_then(|k| k.parse::<usize>().ok())
            {
                if let Some((op, _)) = members.get(k) {
                    e.diagnostics = format!("operation {op}: {}", e.diagnostics);
                }
            }
        }
        e.status = StatusCode::UNPROCESSABLE_ENTITY;
        e
    })
}
