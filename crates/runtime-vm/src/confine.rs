//! QEMU least privilege: the seccomp sandbox (`-sandbox on,...=deny`) and the unprivileged user
//! QEMU drops to once it has opened what it needs at start (`-runas`, or `-run-with user=` on
//! QEMU that has it). Owns the probe of what the installed QEMU supports, the user decision and
//! its fallbacks (ADR 044); must not open files or devices for QEMU (`periph` passes those as
//! descriptors) and must not start VMs.

use std::ffi::CString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

/// The system user QEMU runs as when it exists (create it with
/// `useradd --system --no-create-home --shell /usr/sbin/nologin telvirt-qemu`).
pub const DEFAULT_USER: &str = "telvirt-qemu";
/// The user QEMU runs as when [`DEFAULT_USER`] does not exist.
pub const FALLBACK_USER: &str = "nobody";
/// The deny options every sandboxed QEMU gets.
pub const SANDBOX_DENY: &str = "obsolete=deny,spawn=deny,resourcecontrol=deny";
/// Added when QEMU does not change its user itself: its own `-runas` calls setgid, initgroups
/// and setuid after the filter is installed, and `elevateprivileges=deny` kills it for that.
pub const SANDBOX_DENY_ELEVATE: &str = "elevateprivileges=deny";
/// How long each probe of the QEMU binary may take.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// Which user QEMU runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum QemuUser {
    /// [`DEFAULT_USER`] if it exists, else [`FALLBACK_USER`]; the current user where neither
    /// exists or telvirt is not root (with a warning).
    #[default]
    Auto,
    /// The user telvirt runs as (no change).
    Current,
    /// This user; it must exist and must not be root (uid 0).
    Named(String),
}

impl FromStr for QemuUser {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match s {
            "auto" => Ok(Self::Auto),
            "current" => Ok(Self::Current),
            _ => {
                let ok = !s.is_empty()
                    && s.len() <= 32
                    && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if ok {
                    Ok(Self::Named(s.to_string()))
                } else {
                    Err(Error::InvalidConfig {
                        field: "qemu user",
                        reason: format!(
                            "`{s}` is not `auto`, `current` or a user name (1-32 letters, digits, '-', '_', '.', starting with a letter or '_')"
                        ),
                    })
                }
            }
        }
    }
}

impl TryFrom<String> for QemuUser {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<QemuUser> for String {
    fn from(u: QemuUser) -> String {
        u.to_string()
    }
}

impl fmt::Display for QemuUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Current => f.write_str("current"),
            Self::Named(n) => f.write_str(n),
        }
    }
}

/// How much QEMU is confined: part of the runtime's configuration (one policy per host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// Run QEMU under its seccomp filter with [`SANDBOX_DENY`] (default on).
    #[serde(default = "yes")]
    pub sandbox: bool,
    #[serde(default)]
    pub user: QemuUser,
}

fn yes() -> bool {
    true
}

impl Default for Confinement {
    fn default() -> Self {
        Self {
            sandbox: true,
            user: QemuUser::Auto,
        }
    }
}

/// The option a QEMU binary offers to change its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropOption {
    /// `-run-with user=NAME` (QEMU 9.1 and later).
    RunWith,
    /// `-runas NAME` (QEMU up to 9.x; deprecated in favour of `-run-with`).
    Runas,
}

/// What the installed QEMU supports, found by [`CapsProbe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuCaps {
    /// `Ok` when `-sandbox on,<deny options>` starts; else why not (seccomp not compiled in,
    /// an option this QEMU does not know, ...).
    pub sandbox: std::result::Result<(), String>,
    /// How this QEMU changes its user, if it can.
    pub drop_option: Option<DropOption>,
    /// Whether that option takes a numeric `uid:gid` (a user without a passwd entry: a VM's
    /// own uid, [`crate::uid_lease`]).
    #[serde(default)]
    pub numeric_user: bool,
    /// `(major, minor)` from the first line of `-help`, when it names it.
    #[serde(default)]
    pub version: Option<(u32, u32)>,
    /// Its i440FX machine types (`-machine help`; empty when that could not be read).
    #[serde(default)]
    pub machines: crate::config::MachineTypes,
}

/// Probes a QEMU binary once (per manager) for the sandbox and the user option.
#[derive(Debug, Clone, Default)]
pub struct CapsProbe {
    memo: Arc<tokio::sync::OnceCell<QemuCaps>>,
}

impl CapsProbe {
    /// The capabilities of `qemu`, probed on the first call.
    pub async fn get(&self, qemu: &Path) -> QemuCaps {
        self.memo
            .get_or_init(|| probe(qemu.to_path_buf()))
            .await
            .clone()
    }
}

/// The user option a QEMU `-help` text lists (never assumed from the version).
pub fn drop_option_from_help(help: &str) -> Option<DropOption> {
    let lines = || help.lines().map(str::trim_start);
    if lines().any(|l| l.starts_with("-run-with") && l.contains("user=")) {
        Some(DropOption::RunWith)
    } else if lines().any(|l| l.starts_with("-runas ")) {
        Some(DropOption::Runas)
    } else {
        None
    }
}

/// The full `-sandbox` value the probe checks (every deny option telvirt may use).
pub fn probe_sandbox_value() -> String {
    format!("on,{SANDBOX_DENY},{SANDBOX_DENY_ELEVATE}")
}

/// The `(major, minor)` version `qemu --version` prints; `None` when it cannot be run or says
/// something else.
pub async fn qemu_version(qemu: &Path) -> Option<(u32, u32)> {
    let out = probe_output(qemu, &["--version"]).await?;
    crate::config::parse_qemu_version(&String::from_utf8_lossy(&out.stdout))
}

/// What `qemu ARGS` printed, when it ran within [`PROBE_DEADLINE`] (stdin closed, stderr
/// dropped, killed when late).
async fn probe_output(qemu: &Path, args: &[&str]) -> Option<std::process::Output> {
    let out = tokio::process::Command::from(child_command(qemu))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(PROBE_DEADLINE, out).await.ok()?.ok()
}

/// A command that runs `program` with nothing of this process's but stdio: the node holds
/// VMs' guest RAM and eventfds (their vhost-user NICs' memory tables, received without
/// close-on-exec by the vhost-user daemon), which the kernel would hand to every child that
/// does not close them. Every child the vm runtime starts is built here: each QEMU, probes
/// included (devices reach QEMU over QMP, `getfd`), and the image build's tools.
pub fn child_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(program);
    // SAFETY: the closure calls only close_range, getrlimit and fcntl, which are
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) != 0 {
                // Kernels before 5.11: mark each descriptor up to the open-file limit.
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur.min(1 << 20) as i32
                } else {
                    4096
                };
                for fd in 3..top {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
    cmd
}

async fn probe(qemu: PathBuf) -> QemuCaps {
    let help = tokio::process::Command::from(child_command(&qemu))
        .arg("-help")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    // Its answer is kept for every later start: one that hangs must not hold them all.
    let help = match tokio::time::timeout(PROBE_DEADLINE, help).await {
        Ok(answered) => answered,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("`-help` did not answer within {PROBE_DEADLINE:?}"),
        )),
    };
    let help = match help {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            let why = format!(
                "`{} -help` failed ({}): {}",
                qemu.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return QemuCaps {
                sandbox: Err(why),
                drop_option: None,
                numeric_user: false,
                version: None,
                machines: Default::default(),
            };
        }
        Err(e) => {
            return QemuCaps {
                sandbox: Err(format!("cannot run {}: {e}", qemu.display())),
                drop_option: None,
                numeric_user: false,
                version: None,
                machines: Default::default(),
            };
        }
    };
    let drop_option = drop_option_from_help(&help);
    let sandbox = if help.lines().any(|l| l.starts_with("-sandbox ")) {
        try_sandbox(&qemu).await
    } else {
        Err(format!("{} has no -sandbox option", qemu.display()))
    };
    QemuCaps {
        sandbox,
        drop_option,
        numeric_user: drop_option.is_some() && help.contains("uid:gid"),
        version: crate::config::parse_qemu_version(&help),
        machines: machine_types(&qemu).await,
    }
}

/// The i440FX machine types `qemu -machine help` lists (none when it cannot be run).
pub(crate) async fn machine_types(qemu: &Path) -> crate::config::MachineTypes {
    match probe_output(qemu, &["-machine", "help"]).await {
        Some(o) if o.status.success() => {
            crate::config::MachineTypes::parse(&String::from_utf8_lossy(&o.stdout))
        }
        _ => Default::default(),
    }
}

/// Start QEMU with no machine under the full filter and ask it to quit over QMP on stdio.
async fn try_sandbox(qemu: &Path) -> std::result::Result<(), String> {
    let sandbox = probe_sandbox_value();
    let o = started_and_quit(qemu, &["-sandbox", &sandbox]).await?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`-sandbox {sandbox}` refused ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Starts `qemu` with no machine and `args`, and asks it to quit over QMP on stdio: how it
/// ended (its stderr kept), or why it could not be run or did not quit in time.
async fn started_and_quit(
    qemu: &Path,
    args: &[&str],
) -> std::result::Result<std::process::Output, String> {
    let child = tokio::process::Command::from(child_command(qemu))
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(args)
        .args(["-qmp", "stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = child.map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")
            .await;
    }
    match tokio::time::timeout(PROBE_DEADLINE, child.wait_with_output()).await {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) => Err(format!("waiting for {}: {e}", qemu.display())),
        Err(_) => Err(format!(
            "{} did not quit within {PROBE_DEADLINE:?}",
            qemu.display()
        )),
    }
}

/// A host account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Look a user up in the host's passwd database (`getpwnam_r`).
pub fn lookup_user(name: &str) -> Option<Account> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain data; all-zero is a valid empty record.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of pwd's strings
    // (none are read: only the numeric ids).
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return None;
    }
    Some(Account {
        name: name.to_string(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Whether telvirt can give QEMU an unlimited `RLIMIT_MEMLOCK` before exec: the hard limit is
/// already unlimited, or telvirt holds `CAP_SYS_RESOURCE`. An unprivileged QEMU with
/// `mem-lock=on` needs it: once it drops `CAP_IPC_LOCK`, every later mapping counts against
/// that limit and the guest RAM it locked as root already exceeds it.
pub fn memlock_liftable() -> bool {
    // SAFETY: rlimit is plain data; getrlimit writes one.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rlimit.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0;
    if ok && lim.rlim_max == libc::RLIM_INFINITY {
        return true;
    }
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The confinement one QEMU process got (in `vm.json` and the VM's status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The `-sandbox` value, or `None` when QEMU runs without its filter.
    pub sandbox: Option<String>,
    /// The user QEMU runs as after start: a name, or `uid N` for the current user.
    pub user: String,
    pub uid: u32,
    /// True when QEMU changes to `user` itself after opening what it needs.
    pub dropped: bool,
    /// True when `uid` is this QEMU's own (no other process of the host was given it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own_uid: bool,
}

/// The command-line options, what they give, and the warnings to show for one start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub args: Vec<String>,
    pub applied: Applied,
    pub warnings: Vec<String>,
}

/// The account of QEMU user `name`, given by name: it must exist and must not be root.
pub fn named_account(name: &str, lookup: impl Fn(&str) -> Option<Account>) -> Result<Account> {
    let acct = lookup(name).ok_or_else(|| Error::InvalidConfig {
        field: "qemu user",
        reason: format!(
            "user `{name}` does not exist on this host (create it, or use `auto` or `current`)"
        ),
    })?;
    if acct.uid == 0 {
        return Err(Error::InvalidConfig {
            field: "qemu user",
            reason: format!("user `{name}` has uid 0: QEMU must run unprivileged"),
        });
    }
    Ok(acct)
}

/// Whether a QEMU started under `conf` runs as a uid of its own ([`crate::uid_lease`]): the
/// `auto` user, as root, with a QEMU that changes its user to a numeric `uid:gid`.
pub fn wants_own_uid(conf: &Confinement, caps: &QemuCaps, euid: u32) -> bool {
    conf.user == QemuUser::Auto && euid == 0 && caps.drop_option.is_some() && caps.numeric_user
}

/// Decide the confinement of one QEMU: pure, given the probed capabilities, telvirt's
/// effective uid, a user lookup and the uid leased for this QEMU alone (`own`, when
/// [`wants_own_uid`] and a lease was taken). An explicitly named user that does not exist or
/// is root is an error; everything else the host does not allow falls back with a warning.
pub fn plan(
    conf: &Confinement,
    caps: &QemuCaps,
    euid: u32,
    lookup: impl Fn(&str) -> Option<Account>,
    own: Option<u32>,
) -> Result<Plan> {
    let mut warnings = Vec::new();
    let current = Applied {
        sandbox: None,
        user: format!("uid {euid}"),
        uid: euid,
        dropped: false,
        own_uid: false,
    };
    let own = own.filter(|uid| *uid != 0 && wants_own_uid(conf, caps, euid));
    let target = match &conf.user {
        QemuUser::Current => None,
        QemuUser::Named(name) => Some(named_account(name, &lookup)?),
        QemuUser::Auto if own.is_some() => own.map(|uid| Account {
            name: format!("{uid}:{uid}"),
            uid,
            gid: uid,
        }),
        QemuUser::Auto => {
            let found = lookup(DEFAULT_USER)
                .or_else(|| lookup(FALLBACK_USER))
                .filter(|a| a.uid != 0);
            if found.is_none() {
                warnings.push(format!(
                    "neither user `{DEFAULT_USER}` nor `{FALLBACK_USER}` exists: QEMU runs as uid {euid} (create `{DEFAULT_USER}`)"
                ));
            }
            found
        }
    };
    let mut applied = current;
    let mut args = Vec::new();
    if let Some(acct) = target {
        if euid != 0 {
            if euid != acct.uid {
                warnings.push(format!(
                    "telvirt is not root (uid {euid}): QEMU cannot change to user `{}` and runs as uid {euid}",
                    acct.name
                ));
            }
        } else {
            match caps.drop_option {
                Some(DropOption::RunWith) => {
                    args.extend(["-run-with".to_string(), format!("user={}", acct.name)])
                }
                Some(DropOption::Runas) => args.extend(["-runas".to_string(), acct.name.clone()]),
                None => warnings.push(format!(
                    "this QEMU offers neither -run-with user= nor -runas: it runs as root instead of `{}`",
                    acct.name
                )),
            }
            if !args.is_empty() {
                applied = Applied {
                    sandbox: None,
                    user: match own {
                        Some(uid) => format!("uid {uid} (its own)"),
                        None => acct.name.clone(),
                    },
                    uid: acct.uid,
                    dropped: true,
                    own_uid: own.is_some(),
                };
            }
        }
    }
    if conf.sandbox {
        match &caps.sandbox {
            Ok(()) => {
                let value = if applied.dropped {
                    format!("on,{SANDBOX_DENY}")
                } else {
                    format!("on,{SANDBOX_DENY},{SANDBOX_DENY_ELEVATE}")
                };
                args.extend(["-sandbox".to_string(), value.clone()]);
                applied.sandbox = Some(value);
            }
            Err(why) => warnings.push(format!("QEMU runs without its seccomp sandbox: {why}")),
        }
    } else {
        warnings.push("QEMU's seccomp sandbox is turned off by configuration".into());
    }
    Ok(Plan {
        args,
        applied,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(sandbox: bool, drop_option: Option<DropOption>) -> QemuCaps {
        QemuCaps {
            sandbox: if sandbox {
                Ok(())
            } else {
                Err("seccomp support is disabled".into())
            },
            drop_option,
            numeric_user: drop_option.is_some(),
            version: None,
            machines: Default::default(),
        }
    }

    fn users(names: &'static [(&'static str, u32)]) -> impl Fn(&str) -> Option<Account> {
        move |n| {
            names.iter().find(|(m, _)| *m == n).map(|(m, uid)| Account {
                name: m.to_string(),
                uid: *uid,
                gid: *uid,
            })
        }
    }

    const BOTH: &[(&str, u32)] = &[("telvirt-qemu", 990), ("nobody", 65534), ("root", 0)];
    const NOBODY: &[(&str, u32)] = &[("nobody", 65534), ("root", 0)];
    const NONE: &[(&str, u32)] = &[("root", 0)];

    #[test]
    fn root_drops_to_the_dedicated_user_else_nobody() {
        let c = Confinement::default();
        let p = plan(
            &c,
            &caps(true, Some(DropOption::Runas)),
            0,
            users(BOTH),
            None,
        )
        .unwrap();
        assert_eq!(
            p.args,
            vec![
                "-runas",
                "telvirt-qemu",
                "-sandbox",
                "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
            ]
        );
        assert_eq!(p.applied.uid, 990);
        assert!(p.applied.dropped);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let p = plan(
            &c,
            &caps(true, Some(DropOption::RunWith)),
            0,
            users(NOBODY),
            None,
        )
        .unwrap();
        assert_eq!(&p.args[..2], &["-run-with", "user=nobody"]);
        assert_eq!(p.applied.user, "nobody");
    }

    #[test]
    fn root_gives_each_qemu_its_own_uid_where_qemu_takes_a_numeric_one() {
        let c = Confinement::default();
        let uid = 1_900_000_007;
        let p = plan(
            &c,
            &caps(true, Some(DropOption::Runas)),
            0,
            users(BOTH),
            Some(uid),
        )
        .unwrap();
        assert_eq!(&p.args[..2], &["-runas", "1900000007:1900000007"]);
        assert_eq!(p.applied.user, "uid 1900000007 (its own)");
        assert!(p.applied.dropped && p.applied.own_uid && p.applied.uid == uid);
        assert!(!p.applied.sandbox.unwrap().contains("elevateprivileges"));
        let p = plan(
            &c,
            &caps(true, Some(DropOption::RunWith)),
            0,
            users(BOTH),
            Some(uid),
        )
        .unwrap();
        assert_eq!(&p.args[..2], &["-run-with", "user=1900000007:1900000007"]);
        // A QEMU whose option takes names only, a named user, not root: no own uid.
        let mut names_only = caps(true, Some(DropOption::Runas));
        names_only.numeric_user = false;
        assert!(!wants_own_uid(&c, &names_only, 0));
        let p = plan(&c, &names_only, 0, users(BOTH), Some(uid)).unwrap();
        assert_eq!((p.applied.uid, p.applied.own_uid), (990, false));
        let named = Confinement {
            sandbox: true,
            user: QemuUser::Named("nobody".into()),
        };
        assert!(!wants_own_uid(
            &named,
            &caps(true, Some(DropOption::Runas)),
            0
        ));
        let p = plan(
            &named,
            &caps(true, Some(DropOption::Runas)),
            0,
            users(BOTH),
            Some(uid),
        )
        .unwrap();
        assert_eq!(p.applied.uid, 65534);
        assert!(!wants_own_uid(
            &c,
            &caps(true, Some(DropOption::Runas)),
            1000
        ));
        let p = plan(
            &c,
            &caps(true, Some(DropOption::Runas)),
            1000,
            users(BOTH),
            Some(uid),
        )
        .unwrap();
        assert_eq!((p.applied.uid, p.applied.dropped), (1000, false));
    }

    #[test]
    fn fallbacks_keep_running_with_a_warning() {
        let c = Confinement::default();
        // No suitable user: QEMU stays root, fully sandboxed, and says so.
        let p = plan(
            &c,
            &caps(true, Some(DropOption::Runas)),
            0,
            users(NONE),
            None,
        )
        .unwrap();
        assert!(!p.applied.dropped);
        assert_eq!(p.applied.uid, 0);
        assert_eq!(
            p.args,
            vec![
                "-sandbox",
                "on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges=deny"
            ]
        );
        assert!(p.warnings[0].contains("telvirt-qemu"), "{:?}", p.warnings);
        // Not root: the current user, with elevateprivileges=deny.
        let p = plan(
            &c,
            &caps(true, Some(DropOption::Runas)),
            1000,
            users(BOTH),
            None,
        )
        .unwrap();
        assert_eq!(p.applied.uid, 1000);
        assert!(p.args.iter().all(|a| a != "-runas"));
        assert!(p.args[1].contains("elevateprivileges=deny"));
        assert!(p.warnings[0].contains("not root"), "{:?}", p.warnings);
        // A QEMU without a user option, without seccomp.
        let p = plan(&c, &caps(false, None), 0, users(BOTH), None).unwrap();
        assert!(p.args.is_empty());
        assert_eq!(p.applied.sandbox, None);
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(p.warnings[1].contains("seccomp support is disabled"));
        // Sandbox off by configuration: said, not silent.
        let off = Confinement {
            sandbox: false,
            user: QemuUser::Current,
        };
        let p = plan(
            &off,
            &caps(true, Some(DropOption::Runas)),
            0,
            users(BOTH),
            None,
        )
        .unwrap();
        assert!(p.args.is_empty());
        assert!(p.warnings[0].contains("turned off"), "{:?}", p.warnings);
    }

    #[test]
    fn a_named_user_must_exist_and_be_unprivileged() {
        let named = |n: &str| Confinement {
            sandbox: true,
            user: n.parse().unwrap(),
        };
        let c = caps(true, Some(DropOption::Runas));
        let p = plan(&named("nobody"), &c, 0, users(BOTH), None).unwrap();
        assert_eq!(p.applied.user, "nobody");
        for (name, why) in [("qemu-x", "does not exist"), ("root", "uid 0")] {
            match plan(&named(name), &c, 0, users(BOTH), None) {
                Err(Error::InvalidConfig { field, reason }) => {
                    assert_eq!(field, "qemu user");
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("expected a config error for {name}, got {other:?}"),
            }
        }
        let e = "bad user!".parse::<QemuUser>().unwrap_err().to_string();
        assert!(e.contains("qemu user") && e.contains("auto"), "{e}");
        assert!("".parse::<QemuUser>().is_err());
        assert_eq!("auto".parse::<QemuUser>().unwrap(), QemuUser::Auto);
        assert_eq!("current".parse::<QemuUser>().unwrap(), QemuUser::Current);
        let j: Confinement = serde_json::from_str(r#"{"user": "telvirt-qemu"}"#).unwrap();
        assert!(j.sandbox);
        assert_eq!(j.user, QemuUser::Named("telvirt-qemu".into()));
        assert!(serde_json::from_str::<Confinement>(r#"{"user": "a b"}"#).is_err());
    }

    #[test]
    fn user_option_is_read_from_help() {
        let q72 = "-runas user     change to user id user just before starting the VM\n-sandbox on[,obsolete=allow|deny]";
        assert_eq!(drop_option_from_help(q72), Some(DropOption::Runas));
        let q91 =
            "-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]\n-runas user";
        assert_eq!(drop_option_from_help(q91), Some(DropOption::RunWith));
        let q90 = "-run-with [async-teardown=on|off][,chroot=dir]\n";
        assert_eq!(drop_option_from_help(q90), None);
    }

    #[test]
    fn passwd_lookup() {
        assert_eq!(lookup_user("root").map(|a| a.uid), Some(0));
        assert!(lookup_user("telvirt-no-such-user").is_none());
        assert!(lookup_user("bad\0name").is_none());
    }

    #[tokio::test]
    async fn installed_qemu_is_probed() {
        let Ok(o) = std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
        else {
            eprintln!("skipped: no qemu-system-x86_64 on PATH");
            return;
        };
        assert!(o.status.success());
        let probe = CapsProbe::default();
        let c = probe.get(Path::new("qemu-system-x86_64")).await;
        // Debian's QEMU is built with seccomp and has -runas or -run-with user=, which take a
        // numeric uid:gid too (QEMU 7.2's -help says so under -runas).
        assert_eq!(c.sandbox, Ok(()), "{c:?}");
        assert!(c.drop_option.is_some() && c.numeric_user, "{c:?}");
        // A binary that is not there: a reason, not a panic.
        let missing = CapsProbe::default()
            .get(Path::new("/nonexistent/qemu-system-x86_64"))
            .await;
        assert!(missing.sandbox.unwrap_err().contains("/nonexistent"));
    }
}
