//! The embedded redb database, shared by the session store and the ledger,
//! with group commit.
//!
//! redb serializes write transactions, and a durable commit holds the write
//! lock through its fsync, so one durable commit per operation caps writes at
//! one per fsync. Here each write operation still runs in a write transaction
//! of its own (the same atomicity and isolation as before), but one writer
//! thread runs the queued operations in turn and commits them with
//! `Durability::None`, which publishes a commit in memory without writing it,
//! then ends the batch with an empty commit with `Durability::Immediate`. That
//! commit writes the newest root and flushes every buffered page before its
//! fsync, so it makes all the batch's commits durable (redb documents `None`
//! as "not persisted to disk unless followed by a commit with
//! `Durability::Immediate`"). Each operation is answered with the number of
//! its commit as soon as it is applied, and the writer publishes how far
//! commits are durable; `write` waits for that. Operations arriving meanwhile
//! form the next batch, so one fsync
//! serves every operation that was waiting. The cost: between durable commits
//! the batch's pages stay in redb's write buffer, and pages its commits free
//! are reused only after the durable commit.
//!
//! Readers see non-durable commits, so a read waits, before it answers, for a
//! durable commit covering every commit it could have seen: nothing answered,
//! read or written, can be lost by a crash. [`EmbeddedDb::write_applied`] and
//! [`EmbeddedDb::read_applied`] answer at once instead, with a
//! [`PendingDurability`] the caller waits on before it shows anything that
//! rests on them (a reply calls its model meanwhile).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::{mpsc, oneshot, watch};

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

/// The default of redb's page cache (`PARLEY_STORE_CACHE_MIB`): enough for the
/// pages every reply touches (accounts, open holds, the newest message rows);
/// redb's own default (1 GiB) would let the cache grow with the file.
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

/// The database with its writer thread. Operations run on the blocking pool
/// (reads) or the writer thread (writes), never on async workers.
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

    /// Runs `operation` in a write transaction of its own and commits it when
    /// it succeeds; answers once the commit is durable. A failed operation's
    /// transaction is rolled back.
    pub async fn write<T, E, F>(&self, operation: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<redb::Error> + Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, E> + Send + 'static,
    {
        let (value, pending) = self.write_applied(operation).await?;
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
        F: FnOnce(&WriteTransaction) -> Result<T, E> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let operation: Operation = Box::new(move |transaction| {
            let result = transaction.map_err(E::from).and_then(operation);
            Ran {
                commit: result.is_ok(),
                answer: Box::new(move |commit| {
                    // A caller that stopped waiting leaves the effects in place,
                    // as a finished transaction would.
                    let _ = answer.send((result, commit));
                }),
            }
        });
        self.operations
            .send(operation)
            .map_err(|_| E::from(redb::Error::DatabaseClosed))?;
        let (result, commit) = answered.await.map_err(|_| E::from(panicked()))?;
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

/// A queued write operation: runs in the transaction it is given (or learns
/// why there is none) and says what to do next.
type Operation = Box<dyn FnOnce(Result<&WriteTransaction, redb::Error>) -> Ran + Send>;

/// An operation that ran: whether its transaction is to commit, and how to
/// answer its caller with the number of that commit (of the newest one it
/// saw, when it rolled back) or why the commit failed.
struct Ran {
    commit: bool,
    answer: Box<dyn FnOnce(Result<u64, redb::Error>) + Send>,
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
            let mut taken = 1;
            let mut next = Some(first);
            while let Some(operation) = next {
                next = if taken < MAX_BATCH {
                    queue.try_recv().ok()
                } else {
                    None
                };
                taken += 1;
                self.run_one(&database, operation, &mut numbered, &mut batch);
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

    /// Runs one operation in its own transaction, commits it without fsync
    /// when it succeeds and answers its caller.
    fn run_one(
        &self,
        database: &Database,
        operation: Operation,
        numbered: &mut u64,
        batch: &mut Batch,
    ) {
        let transaction =
            database
                .begin_write()
                .map_err(redb::Error::from)
                .and_then(|mut transaction| {
                    transaction.set_durability(Durability::None)?;
                    Ok(transaction)
                });
        let transaction = match transaction {
            Ok(transaction) => transaction,
            Err(error) => {
                // The operation fails with the error; nothing to commit.
                if let Ok(ran) = catch_unwind(AssertUnwindSafe(|| operation(Err(error)))) {
                    (ran.answer)(Ok(*numbered));
                }
                return;
            }
        };
        // A panicking operation drops its answer, and its transaction rolls
        // back as it is dropped.
        let Ok(ran) = catch_unwind(AssertUnwindSafe(|| operation(Ok(&transaction)))) else {
            return;
        };
        if !ran.commit {
            // Rolled back: its failure is its answer.
            (ran.answer)(Ok(*numbered));
            return;
        }
        (ran.answer)(self.commit(transaction, false, numbered, batch));
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
        transaction: WriteTransaction,
        durable: bool,
        numbered: &mut u64,
        batch: &mut Batch,
    ) -> Result<u64, redb::Error> {
        *numbered += 1;
        let number = *numbered;
        self.newest_commit.store(number, Ordering::SeqCst);
        match transaction.commit() {
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
                return Err(error.into());
            }
        }
        Ok(number)
    }
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
    use redb::{StorageBackend, TableDefinition};

    use super::*;

    const NUMBERS: TableDefinition<u64, u64> = TableDefinition::new("numbers");

    /// A disk whose fsync fails once `failing` is set.
    #[derive(Debug)]
    struct FailingDisk {
        memory: InMemoryBackend,
        failing: Arc<AtomicBool>,
    }

    impl StorageBackend for FailingDisk {
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

    fn insert(number: u64) -> impl FnOnce(&WriteTransaction) -> Result<(), redb::Error> {
        move |transaction| {
            transaction.open_table(NUMBERS)?.insert(number, number)?;
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
        let db = EmbeddedDb::new(
            Database::builder()
                .create_with_backend(InMemoryBackend::new())
                .unwrap(),
        )
        .unwrap();
        let results = join_all((0..500).map(|number| db.write(insert(number)))).await;
        assert!(results.iter().all(Result::is_ok));
        // A failed operation rolls back alone; the others of its batch commit.
        let results = join_all((500..600).map(|number| {
            db.write(move |transaction| {
                insert(number)(transaction)?;
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
                db.write(move |transaction| {
                    let mut table = transaction.open_table(ROW)?;
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
        let db = EmbeddedDb::new(
            Database::builder()
                .create_with_backend(InMemoryBackend::new())
                .unwrap(),
        )
        .unwrap();
        let panicking = db.write(|transaction| -> Result<(), redb::Error> {
            insert(1)(transaction)?;
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
        let failing = Arc::new(AtomicBool::new(false));
        let disk = FailingDisk {
            memory: InMemoryBackend::new(),
            failing: Arc::clone(&failing),
        };
        let db = EmbeddedDb::new(Database::builder().create_with_backend(disk).unwrap()).unwrap();
        let (_, written) = db.write_applied(insert(1)).await.unwrap();
        let (seen, read) = db.read_applied(get(1)).await.unwrap();
        assert_eq!(seen, Some(1));
        written
            .and(read)
            .and(PendingDurability::none())
            .wait::<redb::Error>()
            .await
            .unwrap();
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
        let failing = Arc::new(AtomicBool::new(false));
        let disk = FailingDisk {
            memory: InMemoryBackend::new(),
            failing: Arc::clone(&failing),
        };
        let db = EmbeddedDb::new(Database::builder().create_with_backend(disk).unwrap()).unwrap();
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
    }
}
