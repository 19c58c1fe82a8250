//! One served app: its listener, its instances, and the scaling rules.
//!
//! A connection goes to the least-loaded live instance below the app's
//! concurrency; if every instance is full, a new one is restored (up to
//! `max`; a wake already under way counts as `concurrency` free slots, so
//! a burst wakes as many instances as it needs, not one per connection),
//! else the connection waits (buffered in the kernel's socket) for a slot.
//! [`App::tick`] (every [`TICK`]) reaps dead instances, polls connection
//! counts, stops instances idle for the app's idle timeout (keeping
//! `min`), and keeps the pool of standby VMMs filled.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::api::{AppStatus, InstanceStatus};
use crate::db::AppRecord;
use crate::instance::{Instance, InstanceError, Standby};
use crate::metrics::AppMetrics;
use crate::settings::Settings;
use crate::suspend::{Pairing, Start, PENDING};
use crate::sync::lock;

/// How often the monitor polls instances.
pub const TICK: Duration = Duration::from_millis(20);
/// How long an accepted connection may queue for a free slot before it is
/// dropped (unless an instance is starting for it, which a boot's ready
/// timeout bounds): the request timeout that Cloud Run and Knative
/// default to. A
/// queued connection waits for earlier requests to finish, and on a slow
/// host those can take tens of seconds; dropping it sooner would lose a
/// request that was only slow.
const QUEUE_LIMIT: Duration = Duration::from_secs(300);
/// Console logs kept per app besides the running VMs' and the first
/// boot's: each is capped by its `vmm`, and this bounds how many an app
/// that wakes again and again leaves behind.
pub const KEEP_INSTANCE_LOGS: usize = 32;

#[derive(Default)]
struct State {
    instances: Vec<Arc<Instance>>,
    standby: Vec<Standby>,
    waking: usize,
    /// Instances of an app with volumes being suspended: they count as
    /// live, so no wake (which may boot cold and take the snapshot again)
    /// runs until the suspend has finished with the snapshot and marker.
    suspending: usize,
    waiting: usize,
    /// Holds on the app ([`App::hold`]): while any is held, no instance
    /// starts and connections wait.
    held: usize,
}

/// The scaling settings `little scale` changes while the app serves.
#[derive(Clone, Copy, Debug)]
struct Limits {
    min: usize,
    max: usize,
    concurrency: usize,
    idle_timeout: Duration,
}

impl Limits {
    fn of(spec: &crate::api::AppSpec) -> Self {
        let count = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            min: count(spec.min),
            max: count(spec.max),
            concurrency: count(spec.concurrency),
            idle_timeout: Duration::from_millis(spec.idle_timeout_ms),
        }
    }
}

/// A served app.
pub struct App {
    /// Its record.
    pub record: AppRecord,
    /// Its counters.
    pub metrics: AppMetrics,
    /// The bound listen address.
    pub listen: SocketAddr,
    settings: Arc<Settings>,
    /// Its spec as `little scale` last left it (`record.spec` is the
    /// deploy's).
    spec: Mutex<crate::api::AppSpec>,
    state: Mutex<State>,
    changed: Condvar,
    stopped: AtomicBool,
    next_id: Arc<AtomicU64>,
}

impl App {
    /// Binds the app's listen address and starts accepting.
    pub fn start(
        mut record: AppRecord,
        settings: Arc<Settings>,
        next_id: Arc<AtomicU64>,
    ) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind(&record.listen)?;
        let listen = listener.local_addr()?;
        record.listen = listen.to_string();
        let app = Arc::new(Self {
            spec: Mutex::new(record.spec.clone()),
            record,
            metrics: AppMetrics::default(),
            listen,
            settings,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stopped: AtomicBool::new(false),
            next_id,
        });
        let acceptor = app.clone();
        std::thread::spawn(move || acceptor.accept_loop(listener));
        Ok(app)
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            let Ok(stream) = stream else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let accepted = Instant::now();
            self.metrics.requests.fetch_add(1, Ordering::Relaxed);
            let app = self.clone();
            std::thread::spawn(move || app.dispatch(stream, accepted));
        }
    }

    /// The least-loaded live instance with a free slot, reserved.
    fn pick(&self, st: &State) -> Option<Arc<Instance>> {
        let limit = self.concurrency();
        let chosen = st
            .instances
            .iter()
            .filter(|i| i.alive())
            .map(|i| (i.load(), i))
            .filter(|(load, _)| *load < limit)
            .min_by_key(|(load, _)| *load)
            .map(|(_, i)| i.clone())?;
        chosen.reserve();
        Some(chosen)
    }

    fn limits(&self) -> Limits {
        Limits::of(&lock(&self.spec))
    }

    fn concurrency(&self) -> usize {
        self.limits().concurrency
    }

    /// Its spec now: the deploy's, with `little scale`'s changes.
    pub fn spec(&self) -> crate::api::AppSpec {
        lock(&self.spec).clone()
    }

    /// Applies `scale` (checked as a deploy's settings are) once `store`
    /// has recorded the new spec, then at once: waiting connections see
    /// the new `max` and `concurrency`, the next [`tick`](Self::tick) the
    /// new `min` and idle timeout. One change at a time.
    pub fn rescale(
        &self,
        scale: &crate::api::Scale,
        store: impl FnOnce(&crate::api::AppSpec) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut spec = lock(&self.spec);
        let scaled = spec.scaled(scale)?;
        store(&scaled)?;
        *spec = scaled;
        drop(spec);
        self.changed.notify_all();
        Ok(())
    }

    /// Finds or wakes an instance for `stream` and hands the socket over.
    fn dispatch(self: Arc<Self>, stream: TcpStream, accepted: Instant) {
        let port = self.record.spec.port;
        let mut woke = false;
        while !self.stopped.load(Ordering::Acquire) {
            let mut st = lock(&self.state);
            let mut chosen = self.pick(&st);
            if chosen.is_none() {
                // The polled counts may be a tick old: ask the VMMs.
                for i in &st.instances {
                    let _ = i.refresh();
                }
                chosen = self.pick(&st);
            }
            if let Some(instance) = chosen {
                drop(st);
                match instance.hand_over(&stream, port) {
                    Ok(()) => {
                        if woke {
                            self.metrics.wake_latency.observe(accepted.elapsed());
                        }
                        return;
                    }
                    Err(e) => {
                        eprintln!("little: {}: hand-over failed: {e}", self.record.spec.name);
                        instance.mark_dead();
                        continue;
                    }
                }
            }
            let live = st.instances.iter().filter(|i| i.alive()).count();
            let limits = self.limits();
            if live + st.waking + st.suspending < limits.max
                && st.held == 0
                && st.waking * limits.concurrency <= st.waiting
            {
                st.waking += 1;
                let standby = st.standby.pop();
                drop(st);
                let result = self.wake(standby);
                let mut st = lock(&self.state);
                st.waking -= 1;
                match result {
                    Ok(instance) => {
                        st.instances.push(Arc::new(instance));
                        woke = true;
                    }
                    Err(e) => {
                        eprintln!("little: {}: wake failed: {e}", self.record.spec.name);
                        drop(st);
                        if accepted.elapsed() >= QUEUE_LIMIT {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
                self.changed.notify_all();
                continue;
            }
            // A wake under way (a cold boot may take minutes) will have
            // room for it: only a connection queued for a busy slot with
            // nothing starting gives up.
            if accepted.elapsed() >= QUEUE_LIMIT && st.waking == 0 {
                break;
            }
            st.waiting += 1;
            let (mut st, _) = self
                .changed
                .wait_timeout(st, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
            st.waiting -= 1;
        }
        self.metrics.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Restores the snapshot in `standby` (or in a fresh standby VMM).
    fn wake(&self, standby: Option<Standby>) -> Result<Instance, InstanceError> {
        if !self.record.volume_files.is_empty() {
            return self.wake_with_volumes(standby);
        }
        let standby = match standby {
            Some(mut s) => {
                if s.alive() {
                    s
                } else {
                    s.kill();
                    self.spawn_standby(None)?
                }
            }
            None => self.spawn_standby(None)?,
        };
        let instance = standby.restore()?;
        self.metrics.restored(&instance);
        Ok(instance)
    }

    /// Wakes an app with volumes from what [`Pairing::start`] allows: its
    /// snapshot, its last suspend's file, or (when neither matches the
    /// volumes, or the suspend file cannot be restored) a cold boot with
    /// the volumes as they are (ext4 replays its journal), which takes the
    /// snapshot again. `little ps` and the log say which.
    fn wake_with_volumes(&self, standby: Option<Standby>) -> Result<Instance, InstanceError> {
        let name = &self.record.spec.name;
        let pairing = self.pairing();
        let (instance, how) = match pairing.start() {
            Start::Snapshot => (
                self.restore_with_volumes(standby, None)?,
                "restored from its snapshot (the volumes are as its boot left them)".to_owned(),
            ),
            Start::Suspended(file) => match self.restore_with_volumes(standby, Some(&file)) {
                Ok(instance) => (
                    instance,
                    "resumed from its suspend file (the volumes are as it left them)".to_owned(),
                ),
                Err(e) => {
                    let why = format!(
                        "its suspend file could not be resumed: {}",
                        crate::daemon::error_chain(&e)
                    );
                    self.cold_boot(None, &why)?
                }
            },
            Start::Cold(why) => self.cold_boot(standby, &why)?,
        };
        eprintln!("little: {name}: instance {} {how}", instance.id);
        *lock(&self.metrics.last_start) = Some(how);
        Ok(instance)
    }

    /// Boots the app cold with its volumes, settles the new snapshot with
    /// them, and restores it.
    fn cold_boot(
        &self,
        standby: Option<Standby>,
        why: &str,
    ) -> Result<(Instance, String), InstanceError> {
        // A standby holds the snapshot the boot replaces.
        if let Some(mut standby) = standby {
            standby.kill();
        }
        eprintln!(
            "little: {}: {why}: booting cold with the volumes as they are",
            self.record.spec.name
        );
        crate::deploy::boot_and_snapshot(&self.settings, &self.record)
            .map_err(|e| InstanceError::ColdBoot(Box::new(e)))?;
        self.metrics.cold_boots.fetch_add(1, Ordering::Relaxed);
        let instance = self.restore_with_volumes(None, None)?;
        Ok((instance, format!("booted cold ({why}), then restored")))
    }

    /// Restores the app's snapshot, or `suspended` over it, in `standby`
    /// when it was started for that file as it is now (else in a new
    /// one), once the [`Pairing::mark_moved`] marker is durable.
    fn restore_with_volumes(
        &self,
        standby: Option<Standby>,
        suspended: Option<&Path>,
    ) -> Result<Instance, InstanceError> {
        let file = suspended.unwrap_or(&self.record.snapshot);
        let standby = match standby {
            Some(mut s) => {
                if s.alive() && s.restores(file) {
                    s
                } else {
                    s.kill();
                    self.spawn_standby(suspended)?
                }
            }
            None => self.spawn_standby(suspended)?,
        };
        let marker = self.pairing().marker();
        if let Err(e) = self.pairing().mark_moved() {
            let mut standby = standby;
            standby.kill();
            return Err(InstanceError::Dir(
                marker.display().to_string(),
                std::io::Error::other(e.to_string()),
            ));
        }
        let instance = standby.restore()?;
        self.metrics.restored(&instance);
        Ok(instance)
    }

    fn pairing(&self) -> Pairing<'_> {
        Pairing::new(&self.record.dir, &self.record.volume_files)
    }

    /// [`suspend`](Self::suspend)s `i`, or stops it when that fails; then
    /// lets wakes run again.
    fn suspend_or_kill(&self, i: &Instance) {
        match self.suspend(i) {
            Ok(()) => {
                self.metrics.suspends.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!(
                    "little: {}: suspend of instance {} failed ({e}); the next wake boots cold",
                    self.record.spec.name, i.id
                );
                i.kill();
            }
        }
        lock(&self.state).suspending -= 1;
        self.changed.notify_all();
    }

    /// Suspends idle instance `i` of an app with volumes to disk: the VM
    /// paused and its diff snapshot written once its disk I/O is done, its
    /// VMM stopped, then the volumes and the snapshot made durable and
    /// settled as the app's suspend file ([`Pairing::settle_suspend`]). A
    /// crash before the end leaves the marker, and the next wake boots
    /// cold: never a snapshot against volumes that moved on.
    fn suspend(&self, i: &Instance) -> Result<(), String> {
        let began = Instant::now();
        let err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
        let written = i.dir().join(PENDING);
        let seen = if self.settings.jail {
            Path::new("/").join(PENDING)
        } else {
            written.clone()
        };
        let reply = i
            .pause_and_snapshot(&seen)
            .map_err(|e| err("snapshot", &crate::daemon::error_chain(&e)))?;
        // Out of the instance's folder, which its stop removes.
        let pending = self.record.dir.join(PENDING);
        let moved = std::fs::rename(&written, &pending);
        i.kill();
        moved.map_err(|e| err("moving the snapshot", &e))?;
        crate::jail::give(&pending, crate::jail::user_of(&self.record), 0o600)
            .map_err(|e| err("giving the snapshot", &e))?;
        self.pairing()
            .settle_suspend(&pending)
            .map_err(|e| crate::daemon::error_chain(&e))?;
        if let vmm_api::Reply::Snapshot {
            mem_written,
            elapsed,
            ..
        } = reply
        {
            eprintln!(
                "little: {}: suspended instance {} ({} KiB of memory written, {:.3} ms paused to written, {:.3} ms in all with the syncs)",
                self.record.spec.name,
                i.id,
                mem_written / 1024,
                elapsed.as_secs_f64() * 1e3,
                began.elapsed().as_secs_f64() * 1e3,
            );
        }
        *lock(&self.metrics.last_start) = None;
        Ok(())
    }

    fn spawn_standby(&self, suspended: Option<&Path>) -> Result<Standby, InstanceError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let live: Vec<u64> = {
            let st = lock(&self.state);
            let instances = st.instances.iter().map(|i| i.id);
            instances
                .chain(st.standby.iter().map(Standby::id))
                .collect()
        };
        crate::logs::prune(
            &crate::deploy::logs_dir(&self.record),
            KEEP_INSTANCE_LOGS,
            &live,
        );
        Standby::spawn(&self.settings, &self.record, id, suspended)
    }

    /// What a new standby VMM restores: `Some(None)` the app's snapshot,
    /// `Some(Some(file))` its suspend file, `None` nothing yet (an app
    /// with volumes that will boot cold, or whose volumes are in use).
    fn standby_target(&self) -> Option<Option<std::path::PathBuf>> {
        if self.record.volume_files.is_empty() {
            return Some(None);
        }
        match self.pairing().start() {
            Start::Snapshot => Some(None),
            Start::Suspended(file) => Some(Some(file)),
            Start::Cold(_) => None,
        }
    }

    /// The monitor's periodic pass: reap, poll, stop idle instances, keep
    /// `min` running and the standby pool full.
    pub fn tick(self: &Arc<Self>) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let Limits {
            min,
            max,
            idle_timeout,
            ..
        } = self.limits();
        let mut doomed = Vec::new();
        let mut crashed = Vec::new();
        let (short_of_min, short_of_standby) = {
            let mut st = lock(&self.state);
            let (live, dead): (Vec<_>, Vec<_>) = std::mem::take(&mut st.instances)
                .into_iter()
                .partition(|i| i.alive() && i.refresh().is_ok());
            crashed.extend(dead);
            st.instances = live;
            let now = Instant::now();
            for i in &st.instances {
                let mut idle = lock(&i.idle_since);
                if i.load() == 0 {
                    idle.get_or_insert(now);
                } else {
                    *idle = None;
                }
            }
            let mut keep = Vec::new();
            let mut count = st.instances.len();
            for i in std::mem::take(&mut st.instances) {
                let idle = lock(&i.idle_since).map(|t| now - t);
                let expired = idle.is_some_and(|d| d >= idle_timeout);
                // Over a lowered `max`, an idle instance goes at once.
                let surplus = idle.is_some() && count > max;
                if (expired && count > min) || surplus {
                    count -= 1;
                    doomed.push(i);
                } else {
                    keep.push(i);
                }
            }
            st.instances = keep;
            if !self.record.volume_files.is_empty() {
                st.suspending += doomed.len();
            }
            st.standby.retain_mut(Standby::alive);
            // An app with volumes starts its standby VMM once nothing
            // runs with them, for the file its next instance restores.
            let settled = self.record.volume_files.is_empty()
                || st.instances.len() + st.waking + st.suspending == 0;
            (
                st.instances.len() + st.waking + st.suspending < min && st.held == 0,
                st.standby.len() < self.settings.standby && settled,
            )
        };
        for i in crashed {
            self.metrics.crashes.fetch_add(1, Ordering::Relaxed);
            let why = i.death().unwrap_or_else(|| "unknown".to_owned());
            if why.starts_with("out of memory") {
                self.metrics.oom_kills.fetch_add(1, Ordering::Relaxed);
            } else if why.contains("seccomp") {
                self.metrics.seccomp_kills.fetch_add(1, Ordering::Relaxed);
            }
            eprintln!(
                "little: {}: instance {} died: {why}",
                self.record.spec.name, i.id
            );
            *lock(&self.metrics.last_death) = Some(format!("instance {}: {why}", i.id));
            i.kill();
        }
        for i in doomed {
            self.metrics.kills.fetch_add(1, Ordering::Relaxed);
            if !self.record.volume_files.is_empty() {
                // Off the monitor thread, which serves every app.
                let app = Arc::clone(self);
                std::thread::spawn(move || app.suspend_or_kill(&i));
                continue;
            }
            i.kill();
        }
        let target = if short_of_standby {
            self.standby_target()
        } else {
            None
        };
        if let Some(target) = target {
            match self.spawn_standby(target.as_deref()) {
                Ok(mut s) => {
                    let mut st = lock(&self.state);
                    // `stop` may have emptied the pool while this one
                    // started: it must not outlive the app.
                    if self.stopped.load(Ordering::Acquire) {
                        drop(st);
                        s.kill();
                    } else {
                        st.standby.push(s);
                    }
                }
                Err(e) => eprintln!("little: {}: standby: {e}", self.record.spec.name),
            }
        }
        if short_of_min {
            let standby = {
                let mut st = lock(&self.state);
                st.waking += 1;
                st.standby.pop()
            };
            let result = self.wake(standby);
            let mut st = lock(&self.state);
            st.waking -= 1;
            match result {
                Ok(i) => st.instances.push(Arc::new(i)),
                Err(e) => eprintln!("little: {}: min instance: {e}", self.record.spec.name),
            }
            self.changed.notify_all();
        }
    }

    /// Runs `f` with no instance of the app running, and none starting
    /// until it returns (connections wait, as for a free slot): running
    /// instances are suspended first (an app with volumes; others are
    /// stopped), so its volumes are settled and nothing writes to them.
    /// Returns `f`'s result and how many instances were stopped for it.
    pub fn hold<T>(&self, f: impl FnOnce() -> T) -> (T, usize) {
        let mut stopped = 0;
        let mut st = lock(&self.state);
        st.held += 1;
        loop {
            while st.waking > 0 || st.suspending > 0 {
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let live = std::mem::take(&mut st.instances);
            if live.is_empty() {
                break;
            }
            stopped += live.len();
            if self.record.volume_files.is_empty() {
                drop(st);
                for i in live {
                    i.kill();
                }
            } else {
                st.suspending += live.len();
                drop(st);
                for i in live {
                    self.suspend_or_kill(&i);
                }
            }
            st = lock(&self.state);
        }
        drop(st);
        let out = f();
        lock(&self.state).held -= 1;
        self.changed.notify_all();
        (out, stopped)
    }

    /// Stops accepting and stops every instance and standby VMM.
    /// A suspend under way finishes first: its files are settled before
    /// anything else (a redeploy, a removal) touches the app's folder.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        // Unblock the accept loop.
        let _ = TcpStream::connect_timeout(&self.listen, Duration::from_millis(200));
        let (instances, standby) = {
            let mut st = lock(&self.state);
            while st.suspending > 0 {
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            (
                std::mem::take(&mut st.instances),
                std::mem::take(&mut st.standby),
            )
        };
        for i in instances {
            self.metrics.kills.fetch_add(1, Ordering::Relaxed);
            i.kill();
        }
        for mut s in standby {
            s.kill();
        }
    }

    /// Running instances.
    pub fn instance_count(&self) -> usize {
        lock(&self.state).instances.len()
    }

    /// What `little ps` shows.
    pub fn status(&self) -> AppStatus {
        let st = lock(&self.state);
        AppStatus {
            spec: self.spec(),
            listen: self.listen.to_string(),
            snapshot: self.record.snapshot.display().to_string(),
            instances: st
                .instances
                .iter()
                .map(|i| InstanceStatus {
                    id: i.id,
                    pid: i.pid,
                    age_ms: u64::try_from(i.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    connections: i.load(),
                    rss_kib: i.rss_kib(),
                })
                .collect(),
            standby: st.standby.len(),
            last_death: lock(&self.metrics.last_death).clone(),
            last_start: lock(&self.metrics.last_start).clone(),
            user: crate::jail::user_of(&self.record).map(|(uid, _)| uid),
        }
    }
}
