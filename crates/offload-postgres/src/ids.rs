//! Finding tasks by id. Since schema version 3 an id carries its row's seq
//! (`offload_core::id_carrying_seq`), so a lookup is a seek of the
//! primary key; the ids that carry none (tasks stored before, or by a node
//! of an older version) are in `offload_tasks_id_not_carrying_seq`, which
//! a lookup tries for the ids the seqs did not find.

use std::collections::HashMap;

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
    let mut wanted: HashMap<i64, Uuid> = HashMap::with_capacity(ids.len());
    for id in ids {
        if let Some(seq) = seq_carried_by(*id) {
            wanted.insert(seq, *id);
        }
    }
    let mut found = HashMap::with_capacity(ids.len());
    if !wanted.is_empty() {
        let seqs: Vec<i64> = wanted.keys().copied().collect();
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE seq = ANY($1){}",
            lock.clause()
        ))
        .bind(&seqs)
        .fetch_all(&mut *conn)
        .await?;
        for row in &rows {
            let stored = decode(row)?;
            // A row of an older id at the seq some id happens to carry is
            // not that id's task.
            if wanted.get(&stored.seq) == Some(&stored.task.id) {
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
