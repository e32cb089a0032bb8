//! Finding tasks by id. Since schema version 3 an id carries its row's seq
//! (`offload_core::id_carrying_seq`), so a lookup is a seek of the
//! primary key; the ids that carry none (tasks stored before, or by a node
//! of an older version) are in `offload_tasks_id_not_carrying_seq`, which
//! a lookup tries for the ids the seqs did not find.

use std::collections::{HashMap, HashSet};

use offload_core::seq_carried_by;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::rows::{PgResult, StoredTask, TASK_COLUMNS, decode};

/// How a lookup locks the rows it finds.
#[derive(Clone, Copy)]
pub(crate) enum Lock {
    None,
    /// Against changes: the caller reads a state it must stay in.
    Share,
    /// The caller changes the rows.
    Update,
}

impl Lock {
    fn clause(self) -> &'static str {
        match self {
            Lock::None => "",
            Lock::Share => " FOR SHARE",
            Lock::Update => " FOR UPDATE",
        }
    }
}

/// The tasks of `ids` that are stored, by id.
pub(crate) async fn find(
    conn: &mut PgConnection,
    ids: &[Uuid],
    lock: Lock,
) -> PgResult<HashMap<Uuid, StoredTask>> {
    let wanted: HashSet<Uuid> = ids.iter().copied().collect();
    let seqs: Vec<i64> = ids.iter().filter_map(|id| seq_carried_by(*id)).collect();
    let mut found = HashMap::with_capacity(ids.len());
    if !seqs.is_empty() {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE {}{}",
            crate::sql::BY_SEQ,
            lock.clause()
        ))
        .bind(&seqs)
        .fetch_all(&mut *conn)
        .await?;
        for row in &rows {
            let stored = decode(row)?;
            // The row at a seq an id carries may be another task's: an
            // older id's, or the one a made-up id names.
            if wanted.contains(&stored.task.id) {
                found.insert(stored.task.id, stored);
            }
        }
    }
    let rest: Vec<Uuid> = ids
        .iter()
        .filter(|id| !found.contains_key(*id))
        .copied()
        .collect();
    if !rest.is_empty() {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE {}{}",
            crate::sql::BY_ID_NOT_CARRYING_SEQ,
            lock.clause()
        ))
        .bind(&rest)
        .fetch_all(&mut *conn)
        .await?;
        for row in &rows {
            let stored = decode(row)?;
            found.insert(stored.task.id, stored);
        }
    }
    Ok(found)
}
