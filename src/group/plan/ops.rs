//! Applying one member operation of a PATCH, in any format, to the virtual member list
//! (see the parent module for the rules).

use super::*;

impl<'a> Planner<'a> {
    /// `add`/`replace /member` with an array from a PATCH.
    async fn replace_from_patch(&mut self, index: usize, path: &str, values: &[Value]) -> Result<(), FhirError> {
        let mut members = Vec::with_capacity(values.len());
        let mut seen = HashSet::new();
        for (i, value) in values.iter().enumerate() {
            let member = CompactMember::from_value(value)
                .ok_or_else(|| op_error(index, path, format!("member {i} needs entity.reference")))?;
            if !seen.insert(member.reference.clone()) {
                return Err(op_error(index, path, format!("{} is listed twice", member.reference)));
            }
            self.check_later(index, value);
            members.push(member);
        }
        // Same as `replace_all`, with owned members (they come from the patch document).
        if self.virtual_len() > 0 {
            let keep: HashSet<&str> = members.iter().map(|m| m.reference.as_str()).collect();
            let gone: Vec<String> =
                self.all_active().await?.into_iter().filter(|r| !keep.contains(r.as_str())).collect();
            for reference in gone {
                self.remove(&reference).await?;
            }
        }
        self.prefetch(members.iter().map(|m| m.reference.clone()).collect()).await?;
        for member in members {
            match self.current(&member.reference).await? {
                Some((old, _)) if patch::json_equal(&old.value(), &member.value()) => {}
                Some((_, position)) => {
                    self.draft(EventType::Updated, Cow::Owned(member.clone()), Some(position));
                    self.touched
                        .insert(member.reference.clone(), Touched::Active { member: Box::new(member), position });
                }
                None => {
                    self.add_compact(Cow::Owned(member)).await?;
                }
            }
        }
        Ok(())
    }

    /// Applies one member operation (its path starts with `/member`).
    pub async fn apply(&mut self, index: usize, op: &Operation) -> Result<(), FhirError> {
        let path = op.path().to_string();
        let tokens = patch::tokens(&path);
        match (op, tokens.len()) {
            (Operation::Add { value, .. } | Operation::Replace { value, .. }, 1) => {
                let Value::Array(members) = value else {
                    return Err(op_error(index, &path, "the member array must be a JSON array"));
                };
                self.replace_from_patch(index, &path, members).await
            }
            (Operation::Remove { value: Some(value), .. }, 1) => {
                let reference = member_reference(value)
                    .ok_or_else(|| op_error(index, &path, "remove by value needs value.entity.reference"))?
                    .to_string();
                // RFC 6902: removing what is not there is an error, not a silent success.
                match self.remove(&reference).await? {
                    true => Ok(()),
                    false => Err(op_error(index, &path, format!("{reference} is not an active member of the group"))),
                }
            }
            (Operation::Remove { value: None, .. }, 1) => {
                for reference in self.all_active().await? {
                    self.remove(&reference).await?;
                }
                Ok(())
            }
            (Operation::Add { value, .. }, 2) => {
                if tokens[1] != "-" {
                    let n = tokens[1].parse::<u64>().map_err(|_| op_error(index, &path, "not an array index"))?;
                    if n > self.virtual_len() {
                        return Err(op_error(
                            index,
                            &path,
                            format!("index {n} is past the end ({})", self.virtual_len()),
                        ));
                    }
                }
                self.add(index, value).await
            }
            (Operation::Remove { .. }, 2) => {
                let (reference, _, _) = self.resolve(index, &path, &tokens[1]).await?;
                self.remove(&reference).await.map(drop)
            }
            (Operation::Replace { value, .. }, 2) => {
                let found = self.resolve(index, &path, &tokens[1]).await?;
                self.replace_member(index, found, value).await
            }
            (Operation::Test { value, .. }, 2) => {
                let (_, current, _) = self.resolve(index, &path, &tokens[1]).await?;
                if patch::json_equal(&current.value(), value) {
                    Ok(())
                } else {
                    Err(op_error(index, &path, format!("test failed: the member is {}", current.json)))
                }
            }
            (Operation::Move { .. } | Operation::Copy { .. }, _) => {
                Err(op_error(index, &path, "move and copy are not supported on Group.member; use add and remove"))
            }
            (_, 1) => Err(op_error(index, &path, "test on the whole member array is not supported")),
            (_, _) => self.apply_inside(index, op, &tokens).await,
        }
    }

    /// Replaces a member: the same entity is an update, another entity a removal and an add.
    async fn replace_member(
        &mut self,
        index: usize,
        (reference, old, position): (String, CompactMember, u64),
        value: &Value,
    ) -> Result<(), FhirError> {
        match member_reference(value) {
            Some(r) if r == reference => {
                if !patch::json_equal(&old.value(), value) {
                    self.update(index, value.clone(), position);
                }
                Ok(())
            }
            _ => {
                self.remove(&reference).await?;
                self.add(index, value).await
            }
        }
    }

    /// The member a FHIRPath Patch selects: (reference, member, position), `None` when
    /// there is none.
    async fn select(
        &mut self,
        index: usize,
        path: &str,
        selector: &Selector,
    ) -> Result<Option<(String, CompactMember, u64)>, FhirError> {
        let n = match selector {
            Selector::Reference(r) => return Ok(self.current(r).await?.map(|(m, p)| (r.clone(), m, p))),
            Selector::At(n) => *n,
            Selector::Last => match self.virtual_len() {
                0 => return Ok(None),
                len => len - 1,
            },
        };
        if n >= self.virtual_len() {
            return Err(op_error(
                index,
                path,
                format!("index {n} is out of bounds (the group has {} members)", self.virtual_len()),
            ));
        }
        self.at(n).await
    }

    /// Applies one member change of any PATCH format (see `split`).
    pub async fn apply_member(&mut self, index: usize, op: &MemberOp) -> Result<(), FhirError> {
        let (selector, path) = match op {
            MemberOp::Json(op) => return self.apply(index, op).await,
            MemberOp::Add(value) => return self.add(index, value).await,
            MemberOp::Remove(s) => (s, "Group.member"),
            MemberOp::Replace(s, _) => (s, "Group.member"),
            MemberOp::Edit(s, edit) => (s, edit.text.as_str()),
        };
        let Some(found) = self.select(index, path, selector).await? else {
            return match op {
                MemberOp::Remove(_) => Ok(()),
                _ => Err(op_error(index, path, "the path selects no member")),
            };
        };
        match op {
            MemberOp::Remove(_) => self.remove(&found.0).await.map(drop),
            MemberOp::Replace(_, value) => self.replace_member(index, found, value).await,
            MemberOp::Edit(_, edit) => {
                let (_, current, position) = found;
                let before = current.value();
                let mut member = before.clone();
                fhirpath_patch::apply_one(&mut member, edit).map_err(|e| op_error(index, path, e))?;
                crate::model::lenient::drop_empty(&mut member, "");
                let mut group = group_of(vec![member]);
                repeat_as_arrays(&mut group);
                let member = group["member"][0].take();
                if member_reference(&member) != member_reference(&before) {
                    return Err(op_error(
                        index,
                        path,
                        "a member's entity cannot change; remove it and add the new one",
                    ));
                }
                if member != before {
                    self.update(index, member, position);
                }
                Ok(())
            }
            MemberOp::Json(_) | MemberOp::Add(_) => unreachable!("answered above"),
        }
    }

    /// An operation below `/member/N/`: applied to that member alone.
    async fn apply_inside(&mut self, index: usize, op: &Operation, tokens: &[String]) -> Result<(), FhirError> {
        let path = op.path().to_string();
        let (_, current, position) = self.resolve(index, &path, &tokens[1]).await?;
        let current = current.value();
        let inner: String =
            tokens[2..].iter().map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1"))).collect();
        if tokens[2] == "entity" && !matches!(op, Operation::Test { .. }) {
            return Err(op_error(
                index,
                &path,
                "a member's entity cannot change; remove the member and add the new one",
            ));
        }
        let relative = match op {
            Operation::Add { value, .. } => Operation::Add { path: inner, value: value.clone() },
            Operation::Remove { .. } => Operation::Remove { path: inner, value: None },
            Operation::Replace { value, .. } => Operation::Replace { path: inner, value: value.clone() },
            Operation::Test { value, .. } => Operation::Test { path: inner, value: value.clone() },
            Operation::Move { .. } | Operation::Copy { .. } => unreachable!("handled by the caller"),
        };
        let mut member = current.clone();
        patch::apply(&mut member, std::slice::from_ref(&relative)).map_err(|e| op_error(index, &path, e.reason))?;
        if member != current {
            self.update(index, member, position);
        }
        Ok(())
    }
}
