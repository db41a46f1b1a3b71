//! The embedded redb database, shared by the session store and the ledger,
//! with group commit.
//!
//! redb serializes write transactions, and a durable commit holds the write
//! lock through its fsync, so one durable commit per operation caps writes at
//! one per fsync; and every commit, durable or not, has a fixed cost (the
//! table roots, the freed-page lists, the checksums of every page it
//! touched) that dwarfs a small operation. So one writer thread takes the
//! queued operations in turn and runs several of them in one write
//! transaction, each seeing the effects of those before it, then commits it
//! with `Durability::None`, which publishes the commit in memory without
//! writing it, and answers them. It ends the batch with an empty commit with
//! `Durability::Immediate`. That commit writes the newest root and flushes
//! every buffered page before its fsync, so it makes all the batch's commits
//! durable (redb documents `None` as "not persisted to disk unless followed
//! by a commit with `Durability::Immediate`"). Each operation is answered
//! with the number of its commit as soon as it is applied, and the writer
//! publishes how far commits are durable; `write` waits for that.
//! Operations arriving meanwhile form the next batch, so one fsync serves
//! every operation that was waiting. When the batch's last transaction holds
//! only operations whose callers wait for durability anyway (`write`, not
//! `write_applied`), that transaction is committed durably itself instead of
//! being followed by the empty one.
//!
//! An operation that fails must leave nothing behind, though it may have
//! written before it failed, and redb cannot roll back part of a
//! transaction. So its transaction is abandoned, the operations that ran
//! before it in that transaction run again in a new one (they are `Fn` for
//! this; on the same state they come to the same result), and the failed
//! one runs again in a transaction of its own, which is rolled back: its
//! failure is its answer.
//!
//! Readers see non-durable commits, so a read waits, before it answers, for a
//! durable commit covering every commit it could have seen: nothing answered,
//! read or written, can be lost by a crash. [`EmbeddedDb::write_applied`] and
//! [`EmbeddedDb::read_applied`] answer at once instead, with a
//! [`PendingDurability`] the caller waits on before it shows anything that
//! rests on them (a reply calls its model meanwhile).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::{mpsc, oneshot, watch};

use crate::embedded_tables::WriteTables;

/// Why the database could not be opened. Its own type, so that this module
/// stays below the crate's `Error` (which converts it).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("creating {path}: {source}")]
    CreateDirectory {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening embedded database {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("the task opening the embedded database failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("starting the embedded database writer: {0}")]
    Writer(#[source] std::io::Error),
}

/// Caps the operations sharing one durable commit, so that when they arrive
/// faster than the writer runs them each still waits a bounded time.
const MAX_BATCH: usize = 512;

/// Caps the operations sharing one write transaction: enough to spread a
/// commit's fixed cost, few enough that the first of them is answered soon.
const MAX_TRANSACTION: usize = 64;

/// The default of redb's page cache (`PARLEY_STORE_CACHE_MIB`): enough for the
/// pages every reply touches (accounts, open holds, the newest usage records,
/// tree interiors). A session's messages are mostly read from the session
/// tails instead, and a page missing here is a read from the kernel's page
/// cache, not the disk. At 100 clients 5 MiB misses 0.09 pages a reply (4
/// MiB: 0.5), for 3 MiB less peak RSS than 8 MiB. redb's own default (1
/// GiB) would let the cache grow with the file.
pub const DEFAULT_CACHE_BYTES: usize = 5 << 20;

/// The database with its writer thread. Writes run on the writer thread,
/// reads on the blocking pool, except the short reads a caller runs inline
/// ([`EmbeddedDb::read_applied_inline`]).
pub struct EmbeddedDb {
    database: Arc<Database>,
    operations: mpsc::UnboundedSender<Operation>,
    /// The number of the newest commit begun; numbered before it becomes
    /// visible, so a read transaction holds no commit above it.
    newest_commit: Arc<AtomicU64>,
    durable: watch::Receiver<Durable>,
}

impl EmbeddedDb {
    /// Opens (or creates) the database file `path`, with a page cache of
    /// `cache_bytes`, and starts its writer.
    pub async fn open(path: &Path, cache_bytes: usize) -> Result<Self, OpenError> {
        let path = path.to_owned();
        let database = tokio::task::spawn_blocking(move || {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| OpenError::CreateDirectory {
                    path: parent.to_owned(),
                    source,
                })?;
            }
            Database::builder()
                .set_cache_size(cache_bytes)
                .create(&path)
                .map_err(|source| OpenError::Open { path, source })
        })
        .await??;
        Self::new(database)
    }

    /// Starts the writer of `database`.
    pub fn new(database: Database) -> Result<Self, OpenError> {
        let database = Arc::new(database);
        let (operations, queue) = mpsc::unbounded_channel();
        let newest_commit = Arc::new(AtomicU64::new(0));
        let (publish, durable) = watch::channel(Durable::default());
        let writer = Writer {
            // Weak, so that the file closes as soon as the last handle is
            // dropped and can be opened again at once.
            database: Arc::downgrade(&database),
            newest_commit: Arc::clone(&newest_commit),
            publish,
        };
        std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(OpenError::Writer)?;
        Ok(Self {
            database,
            operations,
            newest_commit,
            durable,
        })
    }

    /// Runs `operation` in a write transaction and commits it when it
    /// succeeds; answers once the commit is durable. A failed operation leaves
    /// no effects. The operation may run more than once (see the module's
    /// documentation); only the run that is committed, or the failure, is
    /// answered.
    pub async fn write<T, E, F>(&self, operation: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<redb::Error> + Send + 'static,
        F: Fn(&mut WriteTables<'_>) -> Result<T, E> + Send + 'static,
    {
        let (value, pending) = self.queue(operation, Answered::Durable).await?;
        pending.wait::<E>().await?;
        Ok(value)
    }

    /// [`EmbeddedDb::write`], answered once the commit is applied: later
    /// operations see it, and the answer says when it is durable. For work
    /// that can overlap the fsync but must not expose its result before it.
    pub async fn write_applied<T, E, F>(&self, operation: F) -> Result<(T, PendingDurability), E>
    where
        T: Send + 'static,
        E: From<redb::Error> + Send + 'static,
        F: Fn(&mut WriteTables<'_>) -> Result<T, E> + Send + 'static,
    {
        self.queue(operation, Answered::Applied).await
    }

    async fn queue<T, E, F>(
        &self,
        operation: F,
        answered: Answered,
    ) -> Result<(T, PendingDurability), E>
    where
        T: Send + 'static,
        E: From<redb::Error> + Send + 'static,
        F: Fn(&mut WriteTables<'_>) -> Result<T, E> + Send + 'static,
    {
        let (answer, answer_received) = oneshot::channel();
        let queued = Box::new(QueuedWrite {
            operation,
            outcome: None,
            answered,
            answer,
        });
        self.operations
            .send(queued)
            .map_err(|_| E::from(redb::Error::DatabaseClosed))?;
        // A panicking operation drops its answer.
        let (result, commit) = answer_received.await.map_err(|_| E::from(panicked()))?;
        self.applied(result, commit?).await
    }

    /// Runs `operation` in a read transaction on the blocking pool; answers
    /// once everything it could have seen is durable.
    pub async fn read<T, E, F>(&self, operation: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<redb::Error> + Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, E> + Send + 'static,
    {
        let (value, pending) = self.read_applied(operation).await?;
        pending.wait::<E>().await?;
        Ok(value)
    }

    /// [`EmbeddedDb::read`], answered at once: it may have seen commits that
    /// are not durable yet, and the answer says when they are.
    pub async fn read_applied<T, E, F>(&self, operation: F) -> Result<(T, PendingDurability), E>
    where
        T: Send + 'static,
        E: From<redb::Error> + Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, E> + Send + 'static,
    {
        let database = Arc::clone(&self.database);
        let newest_commit = Arc::clone(&self.newest_commit);
        let (result, seen) = tokio::task::spawn_blocking(move || {
            let transaction = database.begin_read().map_err(redb::Error::from)?;
            // Loaded after the snapshot was taken: every commit in it was
            // numbered before it became visible.
            let seen = newest_commit.load(Ordering::SeqCst);
            Ok::<_, E>((operation(&transaction), seen))
        })
        .await
        .map_err(|_| E::from(panicked()))??;
        self.applied(result, seen).await
    }

    /// [`EmbeddedDb::read_applied`] on the calling task's thread, for a read
    /// of a few pages that are most likely cached (redb's cache, else the
    /// kernel's): a session's record and the messages appended since its
    /// last reply. Handing such a read to the blocking pool and back cost
    /// more than the read (two thread wake-ups: 4% of the samples at 100
    /// clients, and two hand-offs before a reply's first token).
    pub async fn read_applied_inline<T, E, F>(
        &self,
        operation: F,
    ) -> Result<(T, PendingDurability), E>
    where
        E: From<redb::Error>,
        F: FnOnce(&ReadTransaction) -> Result<T, E>,
    {
        let transaction = self.database.begin_read().map_err(redb::Error::from)?;
        // As in `read_applied`: loaded after the snapshot was taken.
        let seen = self.newest_commit.load(Ordering::SeqCst);
        let result = catch_unwind(AssertUnwindSafe(|| operation(&transaction)))
            .unwrap_or_else(|_| Err(E::from(panicked())));
        drop(transaction);
        self.applied(result, seen).await
    }

    /// The answer of an operation that saw commits up to `commit`: its value
    /// with what to wait on, or its error once those commits are durable (a
    /// refusal may rest on them).
    async fn applied<T, E>(
        &self,
        result: Result<T, E>,
        commit: u64,
    ) -> Result<(T, PendingDurability), E>
    where
        E: From<redb::Error>,
    {
        let pending = PendingDurability(Some((self.durable.clone(), commit)));
        match result {
            Ok(value) => Ok((value, pending)),
            Err(error) => {
                pending.wait::<E>().await?;
                Err(error)
            }
        }
    }
}

/// Effects that are applied (later operations see them) but perhaps not yet
/// durable. Whatever depends on them must not be shown to anyone before
/// [`PendingDurability::wait`] succeeds: a crash before then loses them.
#[must_use = "applied effects must be waited on before anything depending on them is shown"]
pub struct PendingDurability(Option<(watch::Receiver<Durable>, u64)>);

impl PendingDurability {
    /// Nothing pending: a store that answers only once durable.
    pub fn none() -> Self {
        PendingDurability(None)
    }

    /// Pending until both are durable.
    pub fn and(self, other: Self) -> Self {
        match (self.0, other.0) {
            (Some((durable, mine)), Some((_, theirs))) => {
                PendingDurability(Some((durable, mine.max(theirs))))
            }
            (mine, theirs) => PendingDurability(mine.or(theirs)),
        }
    }

    /// Waits until the effects are durable; fails when the durable commit
    /// that would have covered them failed (redb then refuses writes until
    /// the database is reopened).
    pub async fn wait<E: From<redb::Error>>(self) -> Result<(), E> {
        let Some((mut durable, commit)) = self.0 else {
            return Ok(());
        };
        let state = *durable
            .wait_for(|state| state.through >= commit || state.failed_through >= commit)
            .await
            .map_err(|_| redb::Error::DatabaseClosed)?;
        if state.through >= commit {
            Ok(())
        } else {
            Err(redb::Error::PreviousIo.into())
        }
    }
}

/// What a caller sees when its operation panicked; redb's own word for a
/// transaction abandoned by a panic.
fn panicked() -> redb::Error {
    redb::Error::TransactionPoisoned
}

/// A write operation waiting for the writer.
type Operation = Box<dyn Queued>;

/// When a write's caller goes on.
#[derive(Clone, Copy, PartialEq)]
enum Answered {
    /// Once its commit is visible, durable or not.
    Applied,
    /// Once its commit is durable: the writer may as well commit it durably
    /// at once.
    Durable,
}

/// A write operation with the caller waiting for its answer.
trait Queued: Send {
    fn answered(&self) -> Answered;

    /// Runs in the transaction of `tables` and keeps the outcome (replacing
    /// that of an earlier run); whether it succeeded.
    fn run(&mut self, tables: &mut WriteTables<'_>) -> bool;

    /// Answers with the kept outcome and its commit: the number of the commit
    /// that applied it, of the newest one it saw when it failed and was
    /// rolled back, or why that commit failed.
    fn answer(self: Box<Self>, commit: Result<u64, redb::Error>);

    /// Answers with `error`, the reason it could not run, after it saw
    /// commits up to `commit`.
    fn refuse(self: Box<Self>, error: redb::Error, commit: u64);
}

/// The answer to a caller of [`EmbeddedDb::write_applied`].
type Answer<T, E> = (Result<T, E>, Result<u64, redb::Error>);

struct QueuedWrite<T, E, F> {
    operation: F,
    outcome: Option<Result<T, E>>,
    answered: Answered,
    answer: oneshot::Sender<Answer<T, E>>,
}

impl<T, E, F> Queued for QueuedWrite<T, E, F>
where
    T: Send,
    E: From<redb::Error> + Send,
    F: Fn(&mut WriteTables<'_>) -> Result<T, E> + Send,
{
    fn answered(&self) -> Answered {
        self.answered
    }

    fn run(&mut self, tables: &mut WriteTables<'_>) -> bool {
        let outcome = (self.operation)(tables);
        let succeeded = outcome.is_ok();
        self.outcome = Some(outcome);
        succeeded
    }

    fn answer(self: Box<Self>, commit: Result<u64, redb::Error>) {
        // A caller that stopped waiting leaves the effects in place, as a
        // finished transaction would.
        if let Some(outcome) = self.outcome {
            let _ = self.answer.send((outcome, commit));
        }
    }

    fn refuse(self: Box<Self>, error: redb::Error, commit: u64) {
        let _ = self.answer.send((Err(E::from(error)), Ok(commit)));
    }
}

/// How a run of the front operations in one transaction went.
enum FrontRun {
    /// Every one succeeded.
    Succeeded,
    /// The one at this position failed (the ones before it succeeded).
    Failed(usize),
    /// The one at this position panicked (the ones before it succeeded).
    Panicked(usize),
}

/// How far commits are known durable, or known failed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Durable {
    through: u64,
    failed_through: u64,
}

struct Writer {
    database: Weak<Database>,
    newest_commit: Arc<AtomicU64>,
    publish: watch::Sender<Durable>,
}

impl Writer {
    /// Runs batches until every handle is gone.
    fn run(self, mut queue: mpsc::UnboundedReceiver<Operation>) {
        let mut numbered = 0;
        while let Some(first) = queue.blocking_recv() {
            // Without a handle nobody waits for the answers.
            let Some(database) = self.database.upgrade() else {
                continue;
            };
            let mut batch = Batch::default();
            let mut waiting = VecDeque::from([first]);
            let mut taken = 1;
            loop {
                while waiting.len() < MAX_TRANSACTION && taken < MAX_BATCH {
                    let Ok(operation) = queue.try_recv() else {
                        break;
                    };
                    waiting.push_back(operation);
                    taken += 1;
                }
                if waiting.is_empty() {
                    break;
                }
                let last = queue.is_empty() || taken >= MAX_BATCH;
                self.apply_front(&database, &mut waiting, last, &mut numbered, &mut batch);
            }
            // Every operation was answered as soon as it was applied; one
            // empty durable commit makes the whole batch durable.
            if batch.unflushed {
                self.flush(&database, &mut numbered, &mut batch);
            }
            // Before publishing: a caller that closes the database once its
            // write is durable must find the file closed.
            drop(database);
            self.publish.send_modify(|state| {
                state.through = state.through.max(batch.durable_through);
                state.failed_through = state.failed_through.max(batch.failed_through);
            });
        }
    }

    /// Runs the operations at the front of `waiting` in one transaction and
    /// commits it without fsync; when one of them fails, commits those before
    /// it alone or, when it is the first, rolls it back alone. Answers and
    /// removes the operations it settled: at least one.
    ///
    /// When the batch would end with this commit (`last_of_batch` and no
    /// operation left waiting) and none of its operations is answered before
    /// it is durable, the commit is made durable itself: the same answers,
    /// one commit fewer.
    fn apply_front(
        &self,
        database: &Database,
        waiting: &mut VecDeque<Operation>,
        last_of_batch: bool,
        numbered: &mut u64,
        batch: &mut Batch,
    ) {
        let mut count = waiting.len();
        loop {
            let transaction = match database.begin_write() {
                Ok(transaction) => transaction,
                Err(error) => {
                    if let Some(operation) = waiting.pop_front() {
                        operation.refuse(error.into(), *numbered);
                    }
                    return;
                }
            };
            match run_front(&transaction, waiting, count) {
                FrontRun::Succeeded => {
                    let durable = last_of_batch
                        && count == waiting.len()
                        && waiting
                            .iter()
                            .all(|operation| operation.answered() == Answered::Durable);
                    let mut commit = self.commit(transaction, durable, numbered, batch);
                    for operation in waiting.drain(..count) {
                        // One error for its caller; the others learn that
                        // redb refuses writes after it.
                        let theirs = match &commit {
                            Ok(number) => Ok(*number),
                            Err(_) => Err(redb::Error::PreviousIo),
                        };
                        operation.answer(std::mem::replace(&mut commit, theirs));
                    }
                    return;
                }
                FrontRun::Failed(0) => {
                    // Rolled back as it is dropped: its failure is its answer.
                    drop(transaction);
                    if let Some(operation) = waiting.pop_front() {
                        operation.answer(Ok(*numbered));
                    }
                    return;
                }
                // Its writes, if any, go with the transaction; those before it
                // run again without it.
                FrontRun::Failed(position) => count = position,
                FrontRun::Panicked(position) => {
                    // Its caller learns from the dropped answer.
                    drop(waiting.remove(position));
                    if position == 0 {
                        return;
                    }
                    count = position;
                }
            }
        }
    }

    /// An empty durable commit, making every commit before it durable.
    fn flush(&self, database: &Database, numbered: &mut u64, batch: &mut Batch) {
        match database.begin_write() {
            Ok(transaction) => {
                // A failure is recorded in the batch for every waiter.
                let _ = self.commit(transaction, true, numbered, batch);
            }
            Err(_) => batch.failed_through = *numbered,
        }
    }

    /// Commits `transaction` under the next number and records in `batch`
    /// how far commits are durable, or failed.
    fn commit(
        &self,
        mut transaction: WriteTransaction,
        durable: bool,
        numbered: &mut u64,
        batch: &mut Batch,
    ) -> Result<u64, redb::Error> {
        *numbered += 1;
        let number = *numbered;
        self.newest_commit.store(number, Ordering::SeqCst);
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        let committed = transaction
            .set_durability(durability)
            .map_err(redb::Error::from)
            .and_then(|()| Ok(transaction.commit()?));
        match committed {
            Ok(()) if durable => {
                batch.durable_through = number;
                batch.unflushed = false;
            }
            Ok(()) => batch.unflushed = true,
            Err(error) => {
                batch.failed_through = number;
                // redb refuses writes after a failed commit; later ones of
                // the batch fail too and are recorded the same way.
                batch.unflushed = false;
                return Err(error);
            }
        }
        Ok(number)
    }
}

/// Runs the first `count` operations of `waiting` in `transaction`, in turn,
/// until one fails. They share the tables they open: each is opened once
/// ([`WriteTables`]) and closed when this returns, before the commit.
fn run_front(
    transaction: &WriteTransaction,
    waiting: &mut VecDeque<Operation>,
    count: usize,
) -> FrontRun {
    let mut tables = WriteTables::new(transaction);
    for (position, operation) in waiting.iter_mut().take(count).enumerate() {
        match catch_unwind(AssertUnwindSafe(|| operation.run(&mut tables))) {
            Ok(true) => {}
            Ok(false) => return FrontRun::Failed(position),
            Err(_) => return FrontRun::Panicked(position),
        }
    }
    FrontRun::Succeeded
}

/// What one batch of commits came to.
#[derive(Default)]
struct Batch {
    /// A commit since the last durable one is not durable yet.
    unflushed: bool,
    durable_through: u64,
    failed_through: u64,
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::AtomicBool;

    use futures::future::join_all;
    use redb::backends::InMemoryBackend;
    use redb::{ReadableTable, StorageBackend, TableDefinition};

    use super::*;
    use crate::embedded_tables::SESSION_COUNTS;

    const NUMBERS: TableDefinition<u64, u64> = TableDefinition::new("numbers");

    /// A disk whose fsync fails once `failing` is set, and waits while
    /// `holding` is.
    #[derive(Debug)]
    struct TestDisk {
        memory: InMemoryBackend,
        failing: Arc<AtomicBool>,
        holding: Arc<AtomicBool>,
    }

    impl StorageBackend for TestDisk {
        fn len(&self) -> Result<u64, io::Error> {
            self.memory.len()
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
            self.memory.read(offset, out)
        }

        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            self.memory.set_len(len)
        }

        fn sync_data(&self) -> Result<(), io::Error> {
            while self.holding.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if self.failing.load(Ordering::SeqCst) {
                Err(io::Error::other("the disk failed"))
            } else {
                self.memory.sync_data()
            }
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            self.memory.write(offset, data)
        }
    }

    fn in_memory() -> EmbeddedDb {
        EmbeddedDb::new(
            Database::builder()
                .create_with_backend(InMemoryBackend::new())
                .unwrap(),
        )
        .unwrap()
    }

    /// A database whose fsync fails once the first flag is set, and waits
    /// while the second is.
    fn on_test_disk() -> (EmbeddedDb, Arc<AtomicBool>, Arc<AtomicBool>) {
        let failing = Arc::new(AtomicBool::new(false));
        let holding = Arc::new(AtomicBool::new(false));
        let disk = TestDisk {
            memory: InMemoryBackend::new(),
            failing: Arc::clone(&failing),
            holding: Arc::clone(&holding),
        };
        let db = EmbeddedDb::new(Database::builder().create_with_backend(disk).unwrap()).unwrap();
        (db, failing, holding)
    }

    fn on_failing_disk() -> (EmbeddedDb, Arc<AtomicBool>) {
        let (db, failing, _) = on_test_disk();
        (db, failing)
    }

    fn insert(number: u64) -> impl Fn(&mut WriteTables<'_>) -> Result<(), redb::Error> {
        move |tables| {
            tables
                .transaction()
                .open_table(NUMBERS)?
                .insert(number, number)?;
            Ok(())
        }
    }

    fn get(number: u64) -> impl FnOnce(&ReadTransaction) -> Result<Option<u64>, redb::Error> {
        move |transaction| {
            let table = transaction.open_table(NUMBERS)?;
            Ok(table.get(number)?.map(|value| value.value()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_answered_and_a_failed_one_rolls_back_alone() {
        let db = in_memory();
        let results = join_all((0..500).map(|number| db.write(insert(number)))).await;
        assert!(results.iter().all(Result::is_ok));
        // A failed operation rolls back alone; the others of its batch commit.
        let results = join_all((500..600).map(|number| {
            db.write(move |tables| {
                insert(number)(tables)?;
                if number % 2 == 0 {
                    Ok(())
                } else {
                    Err(redb::Error::InvalidSavepoint)
                }
            })
        }))
        .await;
        for (number, result) in (500..600).zip(results) {
            assert_eq!(result.is_ok(), number % 2 == 0);
        }
        for number in 0..600 {
            let expected = (number < 500 || number % 2 == 0).then_some(number);
            assert_eq!(db.read(get(number)).await.unwrap(), expected);
        }
        // Once the writer is idle, every commit is durable.
        assert_eq!(
            db.durable.borrow().through,
            db.newest_commit.load(Ordering::SeqCst)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn operations_sharing_a_transaction_apply_once_and_a_failed_one_leaves_nothing() {
        const COUNTER: &str = "counter";
        let db = in_memory();
        // Each operation adds one to a counter and answers what it made it;
        // every third one fails after writing, and one panics after writing.
        // They write through the table handles the transaction shares.
        let results = join_all((0..600_u64).map(|number| {
            db.write(move |tables| {
                let counts = &mut tables.sessions()?.counts;
                let counted = counts.get(COUNTER)?.map_or(0, |value| value.value()) + 1;
                counts.insert(COUNTER, counted)?;
                counts.insert(number.to_string().as_str(), number)?;
                if number == 301 {
                    panic!("an operation's bug");
                }
                if number % 3 == 0 {
                    return Err(redb::Error::InvalidSavepoint);
                }
                Ok(counted)
            })
        }))
        .await;
        let count = |key: String| {
            db.read(move |transaction| {
                let counts = transaction.open_table(SESSION_COUNTS)?;
                Ok::<_, redb::Error>(counts.get(key.as_str())?.map(|value| value.value()))
            })
        };
        let mut counts = Vec::new();
        for (number, result) in (0..600_u64).zip(results) {
            match result {
                Ok(counted) => counts.push(counted),
                Err(redb::Error::InvalidSavepoint) => assert_eq!(number % 3, 0),
                Err(redb::Error::TransactionPoisoned) => assert_eq!(number, 301),
                Err(error) => panic!("operation {number} failed: {error}"),
            }
            let expected = (number % 3 != 0 && number != 301).then_some(number);
            assert_eq!(
                count(number.to_string()).await.unwrap(),
                expected,
                "row {number}"
            );
        }
        // Each success was applied once, on the effects of those before it.
        counts.sort_unstable();
        let succeeded = counts.len() as u64;
        assert_eq!(succeeded, 600 - 200 - 1);
        assert_eq!(counts, (1..=succeeded).collect::<Vec<_>>());
        assert_eq!(count(COUNTER.to_owned()).await.unwrap(), Some(succeeded));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_write_is_committed_durably_at_once_and_an_applied_one_is_flushed_after() {
        let (db, failing) = on_failing_disk();
        let commits = || db.newest_commit.load(Ordering::SeqCst);
        // Waiting for durability anyway: one durable commit.
        db.write(insert(1)).await.unwrap();
        assert_eq!((commits(), db.durable.borrow().through), (1, 1));
        // Answered before its fsync: its commit, then the durable one.
        let ((), pending) = db.write_applied(insert(2)).await.unwrap();
        pending.wait::<redb::Error>().await.unwrap();
        assert_eq!((commits(), db.durable.borrow().through), (3, 3));
        // A durable commit that fails fails its write.
        failing.store(true, Ordering::SeqCst);
        assert!(db.write(insert(3)).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_larger_than_its_cache_reads_back_whole_after_reopening() {
        const ROWS: u64 = 2_000;
        const ROW: TableDefinition<u64, &[u8]> = TableDefinition::new("rows");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small-cache.redb");
        let row = vec![7_u8; 1_024];
        for reopened in [false, true] {
            // 2 MB of rows through a 64 KiB cache.
            let db = EmbeddedDb::open(&path, 64 << 10).await.unwrap();
            if !reopened {
                let row = row.clone();
                db.write(move |tables| {
                    let mut table = tables.transaction().open_table(ROW)?;
                    for number in 0..ROWS {
                        table.insert(number, row.as_slice())?;
                    }
                    Ok::<_, redb::Error>(())
                })
                .await
                .unwrap();
            }
            let row = row.clone();
            let matching = db
                .read(move |transaction| {
                    let table = transaction.open_table(ROW)?;
                    let mut matching = 0;
                    for number in 0..ROWS {
                        if table.get(number)?.is_some_and(|value| value.value() == row) {
                            matching += 1;
                        }
                    }
                    Ok::<_, redb::Error>(matching)
                })
                .await
                .unwrap();
            assert_eq!(matching, ROWS);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_operation_fails_alone_and_the_writer_goes_on() {
        let db = in_memory();
        let panicking = db.write(|tables| -> Result<(), redb::Error> {
            insert(1)(tables)?;
            panic!("an operation's bug");
        });
        let (panicked, written) = tokio::join!(panicking, db.write(insert(2)));
        assert!(matches!(panicked, Err(redb::Error::TransactionPoisoned)));
        written.unwrap();
        assert_eq!(db.read(get(1)).await.unwrap(), None);
        assert_eq!(db.read(get(2)).await.unwrap(), Some(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applied_writes_are_seen_at_once_and_durable_only_after_their_fsync() {
        let (db, failing, holding) = on_test_disk();
        // Answered, and seen by reads, while no fsync can end.
        holding.store(true, Ordering::SeqCst);
        let (_, written) = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            db.write_applied(insert(1)),
        )
        .await
        .expect("an applied write waited for its fsync")
        .unwrap();
        let (seen, read) = db.read_applied(get(1)).await.unwrap();
        assert_eq!(seen, Some(1));
        let (seen_inline, read_inline) = db.read_applied_inline(get(1)).await.unwrap();
        assert_eq!(seen_inline, Some(1));
        let mut pending = Box::pin(
            written
                .and(read)
                .and(read_inline)
                .and(PendingDurability::none())
                .wait::<redb::Error>(),
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), &mut pending)
                .await
                .is_err(),
            "an applied write was reported durable before its fsync ended"
        );
        holding.store(false, Ordering::SeqCst);
        pending.await.unwrap();
        // Once fsync fails, no applied write is ever confirmed durable.
        failing.store(true, Ordering::SeqCst);
        let confirmed = join_all((2..=200).map(|number| {
            let db = &db;
            async move {
                match db.write_applied(insert(number)).await {
                    Ok(((), pending)) => pending.wait::<redb::Error>().await.is_ok(),
                    Err(_) => false,
                }
            }
        }))
        .await;
        assert!(confirmed.iter().all(|durable| !durable));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fsync_fails_its_whole_batch_and_the_reads_that_could_see_it() {
        let (db, failing) = on_failing_disk();
        db.write(insert(0)).await.unwrap();
        failing.store(true, Ordering::SeqCst);
        let results = join_all((1..=100).map(|number| db.write(insert(number)))).await;
        for result in results {
            assert!(
                result.is_err(),
                "a write was acknowledged though its fsync failed"
            );
        }
        // A read could see the failed commits, so it fails rather than answer.
        assert!(db.read(get(0)).await.is_err());
        let (_, inline) = db.read_applied_inline(get(0)).await.unwrap();
        assert!(inline.wait::<redb::Error>().await.is_err());
    }

    #[tokio::test]
    async fn an_inline_read_that_panics_fails_alone() {
        let db = in_memory();
        db.write(insert(1)).await.unwrap();
        let panicked = db
            .read_applied_inline(|_| -> Result<(), redb::Error> { panic!("a read's bug") })
            .await;
        assert!(matches!(panicked, Err(redb::Error::TransactionPoisoned)));
        let (seen, _) = db.read_applied_inline(get(1)).await.unwrap();
        assert_eq!(seen, Some(1));
    }
}
