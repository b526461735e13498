//! The command line: global flags, subcommands, and the parsers that turn
//! their text into ids, durations, labels and tiers before any call is made.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use payload_client::{PayloadId, Tier};
use payload_proto::core::PayloadState;

/// Exit codes, stable for scripts; `main` maps errors onto them.
pub const EXIT_OK: u8 = 0;
pub const EXIT_OTHER: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_CONFLICT: u8 = 4;
pub const EXIT_NO_CAPACITY: u8 = 5;
pub const EXIT_UNREACHABLE: u8 = 6;

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  any other error
  2  usage error or invalid argument (unknown flag, malformed id, empty input)
  3  payload not found
  4  conflict: the payload is leased, or in the wrong state for the call (e.g. pinned)
  5  out of capacity on the tier
  6  agent unreachable (cannot connect, or it is unavailable)";

#[derive(Parser, Debug)]
#[command(
    name = "payloadctl",
    version,
    about = "Store, read and manage payloads on a Payload Manager agent",
    long_about = None,
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses payloadctl's command line. `--agent` and `--operator`
    /// together are a usage error, but PM_AGENT from the environment (set
    /// in pods for their node's agent) gives way to `--operator`.
    pub fn try_parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::parser::ValueSource;
        use clap::{ArgMatches, CommandFactory, FromArgMatches};
        fn typed(m: &ArgMatches, id: &str) -> bool {
            m.value_source(id) == Some(ValueSource::CommandLine)
                || m.subcommand().is_some_and(|(_, sub)| typed(sub, id))
        }
        let matches = Cli::command().try_get_matches_from(args)?;
        if typed(&matches, "agent") && typed(&matches, "operator") {
            return Err(Cli::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--agent and --operator name two places to ask: pass one",
            ));
        }
        let mut cli = Cli::from_arg_matches(&matches)?;
        if cli.global.operator.is_some() {
            cli.global.agent = None;
        }
        Ok(cli)
    }
}

#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Agent address: unix:///path/agent.sock, /path/agent.sock or
    /// http://host:port. Default: the standalone agent's socket,
    /// $XDG_STATE_HOME/payload-manager/agent.sock, else
    /// ~/.local/state/payload-manager/agent.sock. --operator wins over
    /// PM_AGENT (a pod's setting); not over --agent.
    #[arg(long, env = "PM_AGENT", global = true, value_name = "ADDR")]
    pub agent: Option<String>,
    /// The operator's cluster view instead of an agent (http://host:port,
    /// or https:// with --ca-file): ls, stat, rm, nodes, stats and stream
    /// across every node; rm is carried out by the payload's node. Commands
    /// that move bytes (put, get, pin, spill, promote, lease, gc, import)
    /// need the agent on the node. In a cluster, pass a Kubernetes token
    /// with --token-file (`kubectl create token NAME --audience
    /// payload-manager-view > t`); its user needs the ClusterRole
    /// payload-manager-viewer, or -editor to change (for streams: a
    /// RoleBinding in the stream's namespace is enough). A token is sent
    /// only over https, or plain http to a loopback address.
    #[arg(long, env = "PM_OPERATOR", global = true, value_name = "URL")]
    pub operator: Option<String>,
    /// The CA certificate (PEM) that signed an https:// operator's.
    #[arg(long, env = "PM_CA_FILE", global = true, value_name = "PATH", requires = "operator")]
    pub ca_file: Option<PathBuf>,
    /// A file whose first line is the token to send as `authorization:
    /// Bearer <token>`: an agent's TCP token (its --tcp-token-file), or a
    /// Kubernetes token for --operator.
    #[arg(long, env = "PM_TOKEN_FILE", global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Output format: `table` for people, `json` for scripts.
    #[arg(long, env = "PM_OUTPUT", global = true, value_name = "FORMAT", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Store a file, or stdin with `-`, as a new payload and print its id.
    Put(PutArgs),
    /// Write a payload's bytes to a file or stdout (under a read lease).
    Get(GetArgs),
    /// List payloads, newest first.
    Ls(LsArgs),
    /// Show everything the agent knows about one payload.
    Stat(IdArg),
    /// Delete a payload.
    Rm(RmArgs),
    /// Keep a payload in its tier: it is not spilled while pinned.
    Pin(PinArgs),
    /// Remove a payload's pin.
    Unpin(IdArg),
    /// Move a payload down to a slower tier; returns once it is there.
    Spill(SpillArgs),
    /// Move a payload up to a faster tier; returns once it is there.
    Promote(PromoteArgs),
    /// Take a read lease that outlives this command and lasts until it expires.
    Lease(LeaseArgs),
    /// Show usage per tier and the number of live leases.
    Stats,
    /// List the nodes the operator has heard from (kept across its
    /// restarts), live or not, with each one's tier use (a standalone
    /// agent: itself).
    Nodes,
    /// Delete object-store blocks no payload has named for the grace period.
    Gc(GcArgs),
    /// Adopt an object uploaded to s3://BUCKET/PREFIX/uploads/ID as payload ID
    /// on the object tier (cut into blocks, hashed, deduplicated).
    ///
    /// ID is the id an allocation on the object tier returned, or a new UUID
    /// of your choosing for an object uploaded without one. The upload is
    /// removed once adopted.
    Import(ImportArgs),
    /// Streams: ordered, append-only sequences of payload ids with
    /// consumer-group offsets.
    #[command(subcommand)]
    Stream(StreamCommand),
}

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Create a stream.
    Create(StreamCreateArgs),
    /// Delete a stream with its entries and consumer offsets.
    Rm(StreamName),
    /// Append payloads, in order; prints the offsets they were given.
    Append(StreamAppendArgs),
    /// Print entries from an offset on.
    Read(StreamReadArgs),
    /// Print entries as they are appended, until interrupted.
    Tail(StreamTailArgs),
    /// Record a consumer group's offset.
    Commit(StreamCommitArgs),
    /// Show a consumer group's committed offset.
    Committed(StreamGroupArgs),
}

#[derive(Args, Debug)]
pub struct StreamName {
    /// Stream name.
    pub name: String,
    /// Namespace of the stream.
    #[arg(long, default_value = "")]
    pub namespace: String,
}

#[derive(Args, Debug)]
pub struct StreamCreateArgs {
    #[command(flatten)]
    pub stream: StreamName,
    /// Keep at most this many entries (default: no limit).
    #[arg(long)]
    pub max_entries: Option<u64>,
    /// Drop entries older than this (30s, 10m, 2h, 7d; default: never).
    #[arg(long, value_parser = parse_duration_ms, value_name = "DURATION")]
    pub max_age: Option<u64>,
}

#[derive(Args, Debug)]
pub struct StreamAppendArgs {
    #[command(flatten)]
    pub stream: StreamName,
    /// Payload ids to append, in order.
    #[arg(required = true, value_parser = parse_id, value_name = "ID")]
    pub ids: Vec<PayloadId>,
    /// Tag every appended entry with key=value; repeat for more.
    #[arg(long = "tag", value_parser = parse_label, value_name = "KEY=VALUE")]
    pub tags: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub struct StreamReadArgs {
    #[command(flatten)]
    pub stream: StreamName,
    /// First offset to print.
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Print at most this many entries (default and cap: 10000).
    #[arg(long)]
    pub max: Option<u64>,
}

#[derive(Args, Debug)]
pub struct StreamTailArgs {
    #[command(flatten)]
    pub stream: StreamName,
    /// Start at this offset (default: only entries appended from now on).
    #[arg(long, conflicts_with = "beginning")]
    pub from: Option<u64>,
    /// Start at the oldest entry kept.
    #[arg(long)]
    pub beginning: bool,
}

#[derive(Args, Debug)]
pub struct StreamGroupArgs {
    #[command(flatten)]
    pub stream: StreamName,
    /// Consumer group.
    pub group: String,
}

#[derive(Args, Debug)]
pub struct StreamCommitArgs {
    #[command(flatten)]
    pub group: StreamGroupArgs,
    /// Offset to record.
    pub offset: u64,
}

#[derive(Args, Debug)]
pub struct IdArg {
    /// Payload id, a dashed UUID.
    #[arg(value_parser = parse_id)]
    pub id: PayloadId,
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// File to store, or `-` to read stdin.
    #[arg(value_name = "FILE|-")]
    pub input: PathBuf,
    /// Tier to store the payload on.
    #[arg(long, value_enum, default_value_t = TierArg::Ram)]
    pub tier: TierArg,
    /// Label as key=value; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Time to live: milliseconds, or with a unit (500ms, 30s, 5m, 1h, 1d).
    /// Default: no expiry.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub ttl: Option<u64>,
    /// Send the SHA-256 of the bytes with the commit; the agent refuses a mismatch.
    #[arg(long)]
    pub verify: bool,
    /// Make the bytes durable (fsync) before the commit returns.
    #[arg(long)]
    pub fsync: bool,
    /// Return only once the payload is also in the object store (the agent
    /// needs --object-store); it stays readable on --tier meanwhile.
    #[arg(long)]
    pub object: bool,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// Payload id, a dashed UUID.
    #[arg(value_parser = parse_id)]
    pub id: PayloadId,
    /// Write to this file instead of stdout (`-` = stdout).
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Slowest acceptable tier; a payload below it is promoted first.
    #[arg(long, value_enum)]
    pub min_tier: Option<TierArg>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only payloads on this tier.
    #[arg(long, value_enum)]
    pub tier: Option<TierArg>,
    /// Only payloads in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
    /// Only payloads with this label, as key=value; repeat to require several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Page size (1-500). Default: the agent's (50).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=500))]
    pub limit: Option<i32>,
    /// Follow every page instead of stopping after the first.
    #[arg(long)]
    pub all: bool,
    /// Another node's payloads, as the catalog lists them (a node of the
    /// same cluster, or of a PostgreSQL catalog shared by standalone agents).
    #[arg(long, value_name = "NAME", conflicts_with = "all_nodes")]
    pub node: Option<String>,
    /// Every node's payloads in the catalog, each with its node.
    #[arg(long)]
    pub all_nodes: bool,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Payload id, a dashed UUID.
    #[arg(value_parser = parse_id)]
    pub id: PayloadId,
    /// Delete even while leased: live leases are invalidated.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct PinArgs {
    /// Payload id, a dashed UUID.
    #[arg(value_parser = parse_id)]
    pub id: PayloadId,
    /// Pin for this long (500ms, 30s, 5m, 1h, 1d, or milliseconds). Default:
    /// until unpinned.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration_ms)]
    pub duration: Option<u64>,
}

#[derive(Args, Debug)]
pub struct SpillArgs {
    /// Payload id, a dashed UUID.
    #[arg(value_parser = parse_id)]
    pub id: PayloadId,
    /// Tier to move to (ram, disk or object). Default: the payload's spill
    /// target (disk unless it was allocated with another).
    #[arg(long, value_enum)]
    pub to: Option<TierArg>,
    /// Make the new copy durable (fsync) before the old one is dropped.
    #[arg(long)]
    pub fsync: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Payload id, a dashed UUID.
    #[arg(value_parser = parse_id)]
    pub id: PayloadId,
    /// The object's size in bytes, checked against the upload. Default: the
    /// allocated size, or the upload's own for an id never allocated.
    #[arg(long, value_name = "BYTES")]
    pub size: Option<u64>,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Collect blocks unreferenced for at least this long (500ms, 30s, 5m,
    /// 1h, or milliseconds). Default: the agent's --object-gc-grace-ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub grace: Option<u64>,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// Payload id, a dashed UUID.
    #[arg(value_parser = parse_id)]
    pub id: PayloadId,
    /// Tier to move to.
    #[arg(long, value_enum, default_value_t = TierArg::Ram)]
    pub to: TierArg,
}

#[derive(Args, Debug)]
pub struct LeaseArgs {
    /// Payload id, a dashed UUID.
    #[arg(value_parser = parse_id)]
    pub id: PayloadId,
    /// How long the lease lasts (500ms, 30s, 5m, 1h, or milliseconds); the
    /// agent caps it at its maximum. Default: the agent's default.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub duration: Option<u64>,
    /// Slowest acceptable tier; a payload below it is promoted first.
    #[arg(long, value_enum)]
    pub min_tier: Option<TierArg>,
    /// Hold the lease until interrupted (Ctrl-C or SIGTERM), then release
    /// it. Over the agent's native socket it is a session lease, which
    /// also ends if payloadctl is killed.
    #[arg(long)]
    pub hold: bool,
}

/// The tiers this agent stores payloads on.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierArg {
    Ram,
    Disk,
    /// The object store (the agent needs --object-store).
    Object,
}

impl Command {
    /// The command's name when it needs a node's agent: an operator holds
    /// no payload bytes, pins or leases.
    pub fn moves_bytes(&self) -> Option<&'static str> {
        Some(match self {
            Command::Put(_) => "put",
            Command::Get(_) => "get",
            Command::Pin(_) => "pin",
            Command::Unpin(_) => "unpin",
            Command::Spill(_) => "spill",
            Command::Promote(_) => "promote",
            Command::Lease(_) => "lease",
            Command::Gc(_) => "gc",
            Command::Import(_) => "import",
            Command::Ls(_)
            | Command::Stat(_)
            | Command::Rm(_)
            | Command::Stats
            | Command::Nodes
            | Command::Stream(_) => return None,
        })
    }
}

impl From<TierArg> for Tier {
    fn from(tier: TierArg) -> Tier {
        match tier {
            TierArg::Ram => Tier::Ram,
            TierArg::Disk => Tier::Disk,
            TierArg::Object => Tier::Object,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateArg {
    Allocated,
    Active,
    Spilling,
    Durable,
    Evicting,
    Deleting,
    Expired,
    Deleted,
    Aborted,
}

impl From<StateArg> for PayloadState {
    fn from(state: StateArg) -> PayloadState {
        match state {
            StateArg::Allocated => PayloadState::Allocated,
            StateArg::Active => PayloadState::Active,
            StateArg::Spilling => PayloadState::Spilling,
            StateArg::Durable => PayloadState::Durable,
            StateArg::Evicting => PayloadState::Evicting,
            StateArg::Deleting => PayloadState::Deleting,
            StateArg::Expired => PayloadState::Expired,
            StateArg::Deleted => PayloadState::Deleted,
            StateArg::Aborted => PayloadState::Aborted,
        }
    }
}

/// Accepts a payload id in dashed UUID form only, the form every command prints.
pub fn parse_id(text: &str) -> Result<PayloadId, String> {
    let text = text.trim();
    match PayloadId::try_parse(text) {
        Ok(id) if text.len() == 36 => Ok(id),
        _ => Err("expected a payload id in dashed UUID form, e.g. 67e55044-10b1-426f-9247-bb680e5fe0c8".into()),
    }
}

/// Parses `key=value`; the key must not be empty.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not a label; use key=value")),
    }
}

/// Parses `1500` (milliseconds), `500ms`, `30s`, `5m`, `1h` or `1d` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 1500, 500ms, 30s, 5m or 1h"))?;
    let scale = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown duration unit {other:?}; use ms, s, m, h or d")),
    };
    value.checked_mul(scale).ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_are_milliseconds_unless_a_unit_says_otherwise() {
        assert_eq!(parse_duration_ms("1500"), Ok(1500));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        assert!(parse_duration_ms("5 fortnights").is_err());
        assert!(parse_duration_ms("m").is_err());
        assert!(parse_duration_ms("").is_err());
    }

    #[test]
    fn ids_must_be_dashed_uuids() {
        let id = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert_eq!(parse_id(id).map(|i| i.to_string()), Ok(id.to_string()));
        assert!(parse_id("67e5504410b1426f9247bb680e5fe0c8").is_err());
        assert!(parse_id("not-an-id").unwrap_err().contains("dashed UUID"));
    }

    #[test]
    fn labels_need_a_key_and_may_have_an_empty_value() {
        assert_eq!(parse_label("team=ml"), Ok(("team".into(), "ml".into())));
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_label("flag="), Ok(("flag".into(), String::new())));
        assert!(parse_label("=x").is_err());
        assert!(parse_label("novalue").is_err());
    }

    #[test]
    fn an_operator_is_asked_instead_of_an_agent_never_with_one() {
        let cli = Cli::try_parse_from(["payloadctl", "ls", "--operator", "http://127.0.0.1:50052"]).expect("parses");
        assert_eq!(cli.global.operator.as_deref(), Some("http://127.0.0.1:50052"));
        assert_eq!(cli.command.moves_bytes(), None);
        let both = Cli::try_parse_args(["payloadctl", "--operator", "http://o:1", "--agent", "/a.sock", "ls"]);
        assert!(both.is_err());
        let after = Cli::try_parse_args(["payloadctl", "--operator", "http://o:1", "ls", "--agent", "/a.sock"]);
        assert!(after.is_err(), "after the subcommand too");
        let ca_alone = Cli::try_parse_from(["payloadctl", "--ca-file", "ca.pem", "ls"]);
        assert!(ca_alone.is_err());
        let put = Cli::try_parse_from(["payloadctl", "--operator", "http://o:1", "put", "f"]).expect("parses");
        assert_eq!(put.command.moves_bytes(), Some("put"));
    }

    #[test]
    fn agent_and_output_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "payloadctl",
            "ls",
            "--output",
            "json",
            "--agent",
            "/tmp/a.sock",
            "--all",
        ])
        .expect("parses");
        assert_eq!(cli.global.output, Format::Json);
        assert_eq!(cli.global.agent.as_deref(), Some("/tmp/a.sock"));
        assert!(matches!(cli.command, Command::Ls(LsArgs { all: true, .. })));
    }
}
