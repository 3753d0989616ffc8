//! Keeps one sandbox's durable record in step with its lifecycle. Each
//! change is written before the step it describes is reported done: the
//! definition before its VM is launched, `STARTING` (with the slot) before
//! anything is allocated for it, `RUNNING` (with the process identity) once
//! the agent answered, and no VM once everything is released. A broker that
//! dies at any point finds enough on disk to finish or undo the step.

use std::sync::Arc;

use moat_proto::state::SandboxRecord;

use crate::error::BrokerError;
use crate::state::StateStore;

/// A sandbox's record and where it is kept.
#[derive(Debug)]
pub struct Journal {
    store: Arc<StateStore>,
    record: SandboxRecord,
}

impl Journal {
    pub fn new(store: Arc<StateStore>, record: SandboxRecord) -> Self {
        Self { store, record }
    }

    pub fn record(&self) -> &SandboxRecord {
        &self.record
    }

    pub fn into_record(self) -> SandboxRecord {
        self.record
    }

    /// Applies `change` here only; it is written with the next `save`.
    pub fn stage(&mut self, change: impl FnOnce(&mut SandboxRecord)) {
        change(&mut self.record);
    }

    /// Applies `change` and writes the record durably; on failure nothing
    /// changes, on disk or here.
    pub async fn save(
        &mut self,
        change: impl FnOnce(&mut SandboxRecord),
    ) -> Result<(), BrokerError> {
        let mut next = self.record.clone();
        change(&mut next);
        let store = self.store.clone();
        let written = next.clone();
        tokio::task::spawn_blocking(move || store.save(&written))
            .await
            .map_err(|e| BrokerError::Failed(format!("state writer task: {e}")))?
            .map_err(|e| BrokerError::Failed(format!("cannot record the sandbox's state: {e}")))?;
        self.record = next;
        Ok(())
    }
}
