//! Desired-state changes through the registry: written (one flush for a
//! batch), handed to the sessions of connected nodes, then told to watchers.

use super::{DesiredChange, NodeChange, NodeState, Registry, RegistryError};
use crate::store::{Change, DesiredModuleRecord, DesiredRecord, HistoryOrigin};

/// Desired states written by [`Registry::write_desired`] and not yet
/// flushed: until the caller's flush nothing of them is pushed, so a crash
/// before it loses them as if never asked.
#[derive(Debug, Default)]
pub struct Written {
    /// The changes written (or found in place already), in their order.
    changes: Vec<DesiredChange>,
    /// Each change's node's desired state as stored after it.
    records: Vec<DesiredRecord>,
    /// The nodes of changes left out because they are not enrolled.
    pub missing: Vec<String>,
}

impl Written {
    /// How many changes were written.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.changes.len()
    }

    /// Changes as if written with these records (tests of the push side).
    #[cfg(test)]
    pub(crate) fn of(changes: Vec<DesiredChange>, records: Vec<DesiredRecord>) -> Self {
        Self {
            changes,
            records,
            missing: Vec::new(),
        }
    }
}

impl Registry {
    /// Change the desired state of one module on one node and push it to the
    /// node's session when connected. `None` removes the module.
    pub async fn set_desired_module(
        &self,
        node_id: &str,
        module: &str,
        desired: Option<DesiredModuleRecord>,
        origin: &HistoryOrigin,
    ) -> Result<NodeState, RegistryError> {
        let mut states = self
            .set_desired_modules(
                &[(node_id.to_string(), module.to_string(), desired)],
                origin,
            )
            .await?;
        states
            .pop()
            .ok_or_else(|| RegistryError::UnknownNode(node_id.to_string()))
    }

    /// Several desired-state changes with one durable flush: every change is
    /// on disk before any is pushed to an agent or acknowledged. Unknown
    /// nodes are an error for the whole batch, checked before anything changes.
    pub async fn set_desired_modules(
        &self,
        changes: &[DesiredChange],
        origin: &HistoryOrigin,
    ) -> Result<Vec<NodeState>, RegistryError> {
        if let Some(missing) = self.missing_nodes(changes)?.first() {
            return Err(RegistryError::UnknownNode(missing.clone()));
        }
        // A node removed between the check and the write is left out, as
        // if it had been removed just after.
        let written = self.write_desired(changes.to_vec(), origin)?;
        self.store.flush().await?;
        self.hand_over_desired(&written);
        self.fold();
        self.publish_states(&written.changes)
    }

    /// Remove the desired-state history older than `before_ms` (the
    /// leader's engine does, for `history_retention`).
    pub async fn trim_history(&self, before_ms: u64) -> Result<u64, RegistryError> {
        Ok(self.store.trim_history(before_ms).await?)
    }

    /// The nodes of `changes` that are not enrolled (removed meanwhile).
    pub fn missing_nodes(&self, changes: &[DesiredChange]) -> Result<Vec<String>, RegistryError> {
        let mut missing = Vec::new();
        for (node_id, _, _) in changes {
            if !self.store.has_node(node_id)? {
                missing.push(node_id.clone());
            }
        }
        Ok(missing)
    }

    /// First half of [`Registry::set_desired_modules`]: write the changes
    /// without flushing, so a caller can make them durable with other writes
    /// in one flush. Nothing may be pushed before that flush; then
    /// [`Registry::push_desired`] with what this returned. Each change is
    /// recorded in the desired-state history with `origin`, in the same
    /// transaction. Changes of nodes that are not enrolled (removed
    /// meanwhile) are left out and named in [`Written::missing`].
    pub fn write_desired(
        &self,
        changes: Vec<DesiredChange>,
        origin: &HistoryOrigin,
    ) -> Result<Written, RegistryError> {
        let apply = |(_, module, desired): &DesiredChange, record: &mut DesiredRecord| match desired
        {
            // Unchanged apart from its trace context: keep the entry (and the
            // trace it belongs to) and swap nothing.
            Some(want)
                if record
                    .modules
                    .get(module)
                    .is_some_and(|have| have.same_target(want)) =>
            {
                false
            }
            Some(want) => {
                record.modules.insert(module.clone(), want.clone());
                true
            }
            None => record.modules.remove(module).is_some(),
        };
        let stored = {
            let closures: Vec<_> = changes
                .iter()
                .map(|change| move |record: &mut DesiredRecord| apply(change, record))
                .collect();
            let batch: Vec<(&str, Change<'_, DesiredRecord>)> = changes
                .iter()
                .zip(&closures)
                .map(|((node, _, _), f)| (node.as_str(), f as Change<'_, DesiredRecord>))
                .collect();
            self.store.update_desired_batch(&batch, origin)?
        };
        let mut written = Written::default();
        for (change, record) in changes.into_iter().zip(stored) {
            match record {
                Some(record) => {
                    written.changes.push(change);
                    written.records.push(record);
                }
                None => written.missing.push(change.0),
            }
        }
        Ok(written)
    }

    /// Second half of [`Registry::set_desired_modules`], once `written` is
    /// durable: hand each connected node its new desired state, then tell
    /// watchers.
    pub fn push_desired(&self, written: &Written) -> Result<(), RegistryError> {
        self.hand_over_desired(written);
        self.fold();
        if self.watched() {
            self.publish_states(&written.changes)?;
        } else {
            self.announce(written.changes.len() as u64);
        }
        Ok(())
    }

    /// Once a batch is durable and handed over, what the store keeps of it
    /// for later goes to its final place ([`crate::store::Storage::fold_desired`]),
    /// on a blocking thread of its own when there is a runtime: the caller
    /// (the engine, between a wave's push and its first reports) goes on at
    /// once, and the next desired write waits for the fold only if it comes
    /// first. A failure is the storage's failure, which its next write
    /// reports; what was written stays durable.
    fn fold(&self) {
        let store = self.store.clone();
        let fold = move || {
            if let Err(e) = store.fold_desired() {
                tracing::warn!(error = %e, "cannot fold the last desired batch into per-node records; the next desired write tries again");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(fold)),
            Err(_) => fold(),
        }
    }

    /// Give each connected node of `written` its record.
    fn hand_over_desired(&self, written: &Written) {
        let live = self.lock_live();
        let mut remote = self.shared.get().map(|_| self.lock_remote());
        for ((node_id, _, _), record) in written.changes.iter().zip(&written.records) {
            if let Some(session) = live.get(node_id) {
                if super::remote::hand_over(session, record) {
                    self.stamp_moved(node_id);
                }
            } else if let Some(known) = remote.as_mut().and_then(|r| r.get_mut(node_id)) {
                // Its replica hands it over when the commit reaches it; the
                // engine must not read the node's last report as current
                // meanwhile.
                known.desired_generation = known.desired_generation.max(record.generation);
            }
        }
    }

    /// The states of the nodes of `changes`, each also told to watchers.
    fn publish_states(&self, changes: &[DesiredChange]) -> Result<Vec<NodeState>, RegistryError> {
        let mut states = Vec::with_capacity(changes.len());
        {
            let live = self.lock_live();
            for (node_id, _, _) in changes {
                if let Some(node) = self.store.get_node(node_id)? {
                    states.push(self.state_of(node, &live));
                }
            }
        }
        for state in &states {
            self.publish(NodeChange::Changed(state.clone()));
        }
        Ok(states)
    }
}
