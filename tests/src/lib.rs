//! The sandbox end-to-end tests run against: real `bazaar` processes on
//! loopback ephemeral ports, each with its own temporary data directory,
//! driven over HTTP exactly as a till or an operator would.
//!
//! A [`Node`] is started from the binary cargo built next to the test
//! (`target/<profile>/bazaar`), waits until the node prints the address it
//! listens on, and is stopped by its PID: gracefully with SIGTERM
//! ([`Node::terminate`]), abruptly with SIGKILL ([`Node::kill`]), and always
//! on drop. A node can be restarted on the same data directory.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The admin key every sandbox node is started with.
pub const ADMIN_KEY: &str = "sandbox-admin-key-0123456789abcdef";

/// How long a node may take to start (a debug build on a busy machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository's root (where `README.md`, `bench/` and `target/` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repo root").to_path_buf()
}

/// The `bazaar` binary cargo built for this test run.
pub fn binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = test_exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps");
    let binary = profile_dir.join("bazaar");
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!("{} is missing: run the tests with scripts/test (or `cargo build --bin bazaar` first)", binary.display())
    });
    if let Some(newer) = newest_source(&repo_root()).filter(|(changed, _)| built < *changed) {
        panic!(
            "{} is older than {}: rebuild it with `cargo build --bin bazaar` (scripts/test does)",
            binary.display(),
            newer.1.display()
        );
    }
    binary
}

/// The most recently changed source file of the crates the binary is built
/// from, so a stale binary is refused rather than tested.
fn newest_source(root: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut stack: Vec<PathBuf> =
        ["games", "cluster", "observability", "node"].iter().map(|c| root.join(c).join("src")).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(changed) = entry.metadata().and_then(|m| m.modified()) {
                if newest.as_ref().is_none_or(|(time, _)| *time < changed) {
                    newest = Some((changed, path));
                }
            }
        }
    }
    newest
}

/// A running node and its data.
pub struct Node {
    child: Option<Child>,
    /// The gRPC endpoint, `http://127.0.0.1:<port>`.
    pub grpc: String,
    /// The bootstrap admin key the node is started with, if any.
    admin_key: Option<String>,
    pub url: String,
    /// The data directory, kept across restarts.
    pub data: tempfile::TempDir,
    extra_args: Vec<String>,
    /// Standard error of every run, for post-mortems.
    log: PathBuf,
    /// What the node printed on standard output before it listened.
    pub banner: Vec<String>,
}

impl Node {
    /// Starts a node with the sandbox admin key and `extra_args`.
    pub fn start(extra_args: &[&str]) -> Self {
        Self::start_with(Some(ADMIN_KEY), extra_args)
    }

    /// Starts a node with the given bootstrap admin key (`None`: the node
    /// makes one on its first start and prints it).
    pub fn start_with(admin_key: Option<&str>, extra_args: &[&str]) -> Self {
        let data = tempfile::tempdir().expect("a temporary data directory");
        let log = data.path().join("node.log");
        let mut node = Self {
            child: None,
            admin_key: admin_key.map(str::to_owned),
            grpc: String::new(),
            url: String::new(),
            data,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            log,
            banner: Vec::new(),
        };
        node.launch();
        node
    }

    /// Starts the process (again) on the same data directory.
    fn launch(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("the node's log file opens");
        let mut command = Command::new(binary());
        command
            .arg("serve")
            .arg("--http")
            .arg("127.0.0.1:0")
            .arg("--grpc")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.data.path().join("db"))
            .args(&self.extra_args)
            .env_remove("BAZAAR_ADMIN_KEY")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(key) = &self.admin_key {
            command.arg("--admin-key").arg(key);
        }
        let mut child = command.spawn().expect("the bazaar binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.banner.clear();
        loop {
            let line = match lines_rx.recv_timeout(START_TIMEOUT) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the node did not start; its log:\n{}", self.log_tail());
                }
            };
            if let Some(rest) = line.strip_prefix("bazaar gRPC listening on ") {
                self.grpc = format!("http://{}", rest.trim());
            }
            if let Some(rest) = line.strip_prefix("bazaar listening on ") {
                self.url = rest.split_whitespace().next().expect("an address follows").to_owned();
                break;
            }
            self.banner.push(line);
        }
        self.child = Some(child);
    }

    /// The process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node is running").id()
    }

    /// SIGTERM, then waits for the process to exit (two minutes at most);
    /// returns its status.
    #[track_caller]
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(120))
    }

    /// SIGTERM, then waits up to `within` for the process to exit; kills
    /// it and panics with its log if it has not.
    #[track_caller]
    pub fn terminate_within(&mut self, within: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_within(within)
    }

    /// Sends `signal` to the node by its PID, without waiting.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pids fit pid_t");
        // SAFETY: signalling a child process we own, by its PID.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Whether the node's process is still running.
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("the node was started");
        child.try_wait().expect("the node's status").is_none()
    }

    /// Waits up to `within` for the node to exit; kills it and panics with
    /// its log if it has not.
    #[track_caller]
    pub fn wait_within(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the node is running");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("the node's status") {
                return status;
            }
            if deadline < std::time::Instant::now() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the node did not stop within {within:?}; its log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the node dies at once, mid-flight.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the node is running");
        child.kill().expect("SIGKILL is delivered");
        let _ = child.wait();
    }

    /// Starts the node again on the same data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the node before restarting it");
        self.launch();
    }

    /// The node's whole log so far (every start of it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of everything the node logged.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A client with the given key (or none).
    pub fn client(&self, key: Option<&str>) -> Client {
        Client {
            base: self.url.clone(),
            key: key.map(str::to_owned),
            agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build(),
        }
    }

    /// A client with the node's bootstrap admin key.
    pub fn admin(&self) -> Client {
        self.client(self.admin_key.as_deref())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- node log ---\n{}", self.log_tail());
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: Value,
}

/// The events of an open stream; dropping it closes the connection (at the
/// next event or keep-alive).
pub struct SseStream {
    events: mpsc::Receiver<SseEvent>,
}

impl SseStream {
    /// The next event, or panics after `within`.
    #[track_caller]
    pub fn next(&self, within: Duration) -> SseEvent {
        self.events.recv_timeout(within).unwrap_or_else(|e| panic!("no event within {within:?}: {e}"))
    }

    /// Whether the stream ends (its connection closes) within `within`,
    /// whatever events come before.
    pub fn ends_within(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
    }

    /// Events until one named `name` arrives (which is returned last).
    #[track_caller]
    pub fn until(&self, name: &str, within: Duration) -> Vec<SseEvent> {
        let deadline = std::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let event = self.next(left);
            let done = event.event == name;
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}

/// A status code and the JSON body (or `Value::Null` for a non-JSON body).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The `x-request-id` the node echoed.
    pub request_id: Option<String>,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// Asserts the status and returns the body.
    #[track_caller]
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(self.status, status, "unexpected answer: {}", self.text);
        self.body
    }

    /// Asserts an error answer with this status, code and field.
    #[track_caller]
    pub fn expect_error(self, status: u16, code: &str, field: Option<&str>) -> Value {
        assert_eq!(self.status, status, "unexpected answer: {}", self.text);
        let error = &self.body["error"];
        assert_eq!(error["code"], code, "unexpected error: {}", self.text);
        assert_eq!(error["field"].as_str(), field, "unexpected field: {}", self.text);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "no message: {}", self.text);
        self.body
    }
}

/// An HTTP client bound to one node and one key.
#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let mut request = self.agent.request(method, &format!("{}{}", self.base, path));
        if let Some(key) = &self.key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        request
    }

    fn finish(result: Result<ureq::Response, ureq::Error>) -> Answer {
        Self::try_finish(result).unwrap_or_else(|error| panic!("transport error: {error}"))
    }

    fn try_finish(result: Result<ureq::Response, ureq::Error>) -> Result<Answer, String> {
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(error) => return Err(error.to_string()),
        };
        let status = response.status();
        let request_id = response.header("x-request-id").map(str::to_owned);
        let text = response.into_string().map_err(|e| e.to_string())?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer { status, request_id, body, text })
    }

    /// Opens a Server-Sent Events stream; `last_event_id` resumes one.
    pub fn sse(&self, path: &str, last_event_id: Option<&str>) -> SseStream {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(30))
            .build();
        let mut request = agent.get(&format!("{}{}", self.base, path)).set("Accept", "text/event-stream");
        if let Some(key) = &self.key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        if let Some(id) = last_event_id {
            request = request.set("Last-Event-ID", id);
        }
        let response = request.call().unwrap_or_else(|e| panic!("the stream opens: {e}"));
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        let (sender, events) = mpsc::channel();
        std::thread::spawn(move || {
            let mut event = SseEvent::default();
            for line in BufReader::new(response.into_reader()).lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    if !event.event.is_empty() && sender.send(std::mem::take(&mut event)).is_err() {
                        return;
                    }
                    event = SseEvent::default();
                } else if let Some(name) = line.strip_prefix("event:") {
                    event.event = name.trim().to_owned();
                } else if let Some(id) = line.strip_prefix("id:") {
                    event.id = id.trim().to_owned();
                } else if let Some(data) = line.strip_prefix("data:") {
                    event.data = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                }
            }
        });
        SseStream { events }
    }

    /// A POST whose transport may fail (the node may be gone).
    pub fn try_post(&self, path: &str, body: Value) -> Result<Answer, String> {
        Self::try_finish(self.request("POST", path).send_json(body))
    }

    pub fn get(&self, path: &str) -> Answer {
        Self::finish(self.request("GET", path).call())
    }

    pub fn post(&self, path: &str, body: Value) -> Answer {
        Self::finish(self.request("POST", path).send_json(body))
    }

    pub fn put(&self, path: &str, body: Value) -> Answer {
        Self::finish(self.request("PUT", path).send_json(body))
    }

    /// Sends `body` as is, with the given content type (or none).
    pub fn raw(&self, method: &str, path: &str, content_type: Option<&str>, body: &str) -> Answer {
        let mut request = self.request(method, path);
        if let Some(content_type) = content_type {
            request = request.set("Content-Type", content_type);
        }
        Self::finish(request.send_string(body))
    }
}

/// A tool the install script linked into `target/test-tools/`, or from PATH.
pub fn tool(name: &str) -> PathBuf {
    let linked = repo_root().join("target").join("test-tools").join(name);
    if linked.exists() {
        return linked;
    }
    PathBuf::from(name)
}

/// SHA-256 commitment of API.md: hex of SHA-256 over `"<trigger>:<salt>"`.
pub fn commitment(trigger_minor: i64, salt_hex: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(format!("{trigger_minor}:{salt_hex}").as_bytes()))
}

/// A mall set up through the API: a tenant with keys for every role, four
/// stores in two categories, a campaign, a wheel, a jackpot, a mission and
/// two leaderboards.
pub struct Mall {
    pub tenant: String,
    pub operator: Client,
    pub pos: Client,
    pub display: Client,
    pos_key: Option<String>,
    display_key: Option<String>,
}

impl Mall {
    /// Creates the mall `tenant` on `node`. `jackpot` overrides the jackpot
    /// definition.
    pub fn create(node: &Node, tenant: &str, jackpot: Value) -> Self {
        let admin = node.admin();
        admin
            .post("/v1/tenants", json!({"id": tenant, "name": format!("{tenant} mall"), "currency": "EUR"}))
            .expect(201);
        let key = |role: &str| {
            let answer = admin.post(&format!("/v1/tenants/{tenant}/keys"), json!({"role": role})).expect(201);
            answer["key"].as_str().expect("a key").to_owned()
        };
        let (pos_key, display_key) = (key("pos"), key("display"));
        let mall = Self {
            tenant: tenant.to_owned(),
            operator: node.client(Some(&key("operator"))),
            pos: node.client(Some(&pos_key)),
            display: node.client(Some(&display_key)),
            pos_key: Some(pos_key),
            display_key: Some(display_key),
        };
        let op = &mall.operator;
        for (store, category) in [("s-1", "fashion"), ("s-2", "fashion"), ("s-3", "food"), ("s-4", "food")] {
            op.put(
                &mall.path(&format!("stores/{store}")),
                json!({"name": format!("Shop {store}"), "category": category}),
            )
            .expect(200);
        }
        op.put(
            &mall.path("campaigns/bf"),
            json!({
                "name": "Black Friday", "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z",
                "stores": null,
                "earning": {"points_per_unit_minor": 100, "tier_multipliers_pct": {"gold": 200},
                            "store_multipliers_pct": {"s-4": 300}, "event_bonus": {"visit": 5, "referral": 50}},
                "tiers": [{"name": "silver", "min_points": 100}, {"name": "gold", "min_points": 5000}]
            }),
        )
        .expect(200);
        op.put(
            &mall.path("wheels/w-main"),
            json!({
                "campaign": "bf", "cost": {"entitlements": 1}, "daily_limit": 3,
                "earn": {"min_purchase_minor": 10000, "spins": 1},
                "segments": [
                    {"label": "50 points", "weight": 60, "prize": {"points": 50}},
                    {"label": "coupon", "weight": 30, "prize": {"coupon": "BF"}},
                    {"label": "cashback", "weight": 10, "prize": {"cashback_minor": 500}},
                    {"label": "tv", "weight": 0, "prize": {"item": "TV"}, "stock": 1}
                ]
            }),
        )
        .expect(200);
        op.put(&mall.path("jackpots/j-mall"), jackpot).expect(200);
        op.put(
            &mall.path("missions/m-3shops"),
            json!({
                "campaign": "bf", "name": "Buy in 3 different shops", "repeatable": false,
                "steps": [{"kind": "purchase", "min_amount_minor": 1000, "count": 3, "distinct_stores": true}],
                "reward": {"points": 300, "spins": {"wheel": "w-main", "count": 2}}
            }),
        )
        .expect(200);
        op.put(&mall.path("leaderboards/lb-spend"), json!({"campaign": "bf", "metric": "spend", "top_size": 10}))
            .expect(200);
        op.put(&mall.path("leaderboards/lb-points"), json!({"campaign": "bf", "metric": "points"})).expect(200);
        mall
    }

    /// The pos key, to reconnect after a restart.
    pub fn pos_key(&self) -> Option<&str> {
        self.pos_key.as_deref()
    }

    /// The display key.
    pub fn display_key(&self) -> &str {
        self.display_key.as_deref().expect("a display key")
    }

    /// A display client on `node` (after a restart the URL changes).
    pub fn display_on(&self, node: &Node) -> Client {
        node.client(self.display_key.as_deref())
    }

    /// `/v1/tenants/<tenant>/<rest>`.
    pub fn path(&self, rest: &str) -> String {
        format!("/v1/tenants/{}/{rest}", self.tenant)
    }

    /// A purchase event body.
    pub fn purchase(event_id: &str, customer: &str, store: &str, amount_minor: i64) -> Value {
        json!({"event_id": event_id, "customer": customer, "store": store, "kind": "purchase", "amount_minor": amount_minor})
    }
}

/// A jackpot definition: seed 100.00, cap 1,000.00, 10% of each purchase of
/// at least 10.00, a fifth of that to the reserve.
pub fn default_jackpot() -> Value {
    json!({"campaign": "bf", "seed_minor": 10000, "cap_minor": 100000, "contribution_bps": 1000,
           "reserve_bps": 2000, "min_purchase_minor": 1000})
}

/// The value of the first sample line of a Prometheus scrape that starts
/// with `series` (a name, with its labels if it has any), if present.
pub fn metric_sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Checks a jackpot view's books: seeded + contributed == pool + reserve + paid.
#[track_caller]
pub fn assert_books_balance(jackpot: &Value) {
    let n = |v: &Value| v.as_i64().expect("an integer");
    let books = &jackpot["books"];
    assert_eq!(
        n(&books["seeded_minor"]) + n(&books["contributed_minor"]),
        n(&jackpot["pool_minor"]) + n(&jackpot["reserve_minor"]) + n(&books["paid_minor"]),
        "books do not balance: {jackpot}"
    );
}

/// How long [`eventually`] waits: far longer than a score takes to reach
/// its leaderboard (a commit or two), so that a slow machine passes too.
pub const EVENTUALLY: Duration = Duration::from_secs(30);

/// Calls `check` until it returns `Ok`, every 20 ms for up to
/// [`EVENTUALLY`], and returns its value; panics with its last `Err`.
/// For what settles just after an answer: a score reaches its
/// leaderboard after the event's answer, not before it.
#[track_caller]
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = std::time::Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if EVENTUALLY <= started.elapsed() => panic!("{what}: not so after {EVENTUALLY:?}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The sum of the scores of a leaderboard answer's entries.
pub fn board_total(board: &Value) -> i64 {
    board["entries"].as_array().expect("entries").iter().map(|e| e["score"].as_i64().expect("score")).sum()
}

/// Waits until the leaderboard answer at `path` (with a `top` that takes
/// in every member) sums to `expected`: [`eventually`], since a score
/// reaches its board just after its event's answer.
#[track_caller]
pub fn await_board_total(client: &Client, path: &str, expected: i64) {
    eventually(&format!("{path} sums to {expected}"), || {
        let total = board_total(&client.get(path).expect(200));
        (total == expected).then_some(()).ok_or_else(|| format!("it sums to {total}"))
    });
}
