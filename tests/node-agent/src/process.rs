//! Starting and signalling container processes.
//!
//! A container runs as `ip netns exec <netns> <agent> exec-container --bind SRC=DST.. -- argv..`:
//! `ip netns exec` enters the pod's network namespace and a private mount namespace (mounts made
//! there do not propagate back to the host), `exec-container` bind-mounts the pod's volumes at
//! their `mountPath`s, drops to `runAsUser`/`runAsGroup` and execs the program. The process is the
//! leader of its own process group, so signals reach its children too.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Errors starting a container.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The log file could not be opened.
    #[error("opening log file {path}: {source}")]
    Log {
        /// The log file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The launcher could not be spawned.
    #[error("spawning container process: {0}")]
    Spawn(#[source] std::io::Error),
    /// A `--bind` argument is not `SRC=DST[:ro]`.
    #[error("bad --bind {0:?}: expected SRC=DST or SRC=DST:ro")]
    BadBind(String),
    /// `mount` failed.
    #[error("mount {0}: {1}")]
    Mount(String, String),
    /// `exec` failed.
    #[error("exec {0}: {1}")]
    Exec(String, #[source] std::io::Error),
}

/// One bind mount of a materialised volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Directory or file on the host (in the state dir).
    pub source: PathBuf,
    /// Path the process sees.
    pub target: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
}

impl Bind {
    /// The `--bind` argument form.
    pub fn to_arg(&self) -> String {
        let ro = if self.read_only { ":ro" } else { "" };
        format!("{}={}{}", self.source.display(), self.target.display(), ro)
    }

    /// Parses the `--bind` argument form.
    pub fn parse(arg: &str) -> Result<Self, ProcessError> {
        let (source, rest) = arg
            .split_once('=')
            .ok_or_else(|| ProcessError::BadBind(arg.to_owned()))?;
        let (target, read_only) = match rest.strip_suffix(":ro") {
            Some(t) => (t, true),
            None => (rest, false),
        };
        if source.is_empty() || target.is_empty() {
            return Err(ProcessError::BadBind(arg.to_owned()));
        }
        Ok(Self {
            source: source.into(),
            target: target.into(),
            read_only,
        })
    }
}

/// Everything needed to start one container run.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// `ip` binary.
    pub ip: PathBuf,
    /// This agent's executable.
    pub self_exe: PathBuf,
    /// Network namespace, `None` for hostNetwork pods.
    pub netns: Option<String>,
    /// Volume binds.
    pub binds: Vec<Bind>,
    /// runAsUser.
    pub uid: Option<u32>,
    /// runAsGroup.
    pub gid: Option<u32>,
    /// Working directory.
    pub workdir: PathBuf,
    /// argv, program first.
    pub argv: Vec<String>,
    /// The full environment.
    pub env: Vec<(String, String)>,
    /// Log file for stdout and stderr.
    pub log: PathBuf,
}

/// Spawns the container process (see the module docs for the process shape).
pub fn spawn(spec: &LaunchSpec) -> Result<tokio::process::Child, ProcessError> {
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|source| ProcessError::Log {
                path: spec.log.display().to_string(),
                source,
            })
    };
    let (stdout, stderr) = (open_log()?, open_log()?);
    let mut cmd = match &spec.netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new(&spec.ip);
            c.args(["netns", "exec", ns]).arg(&spec.self_exe);
            c
        }
        None => {
            let mut c = tokio::process::Command::new("unshare");
            c.args(["--mount", "--propagation", "slave", "--"])
                .arg(&spec.self_exe);
            c
        }
    };
    cmd.arg("exec-container");
    for b in &spec.binds {
        cmd.arg("--bind").arg(b.to_arg());
    }
    if let Some(uid) = spec.uid {
        cmd.arg("--uid").arg(uid.to_string());
    }
    if let Some(gid) = spec.gid {
        cmd.arg("--gid").arg(gid.to_string());
    }
    cmd.arg("--workdir")
        .arg(&spec.workdir)
        .arg("--")
        .args(&spec.argv);
    cmd.env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn().map_err(ProcessError::Spawn)
}

/// Orders binds so that no mount hides the source of a later one: a bind whose target
/// contains another bind's source (an emptyDir at `/tmp` while the agent's state dir is under
/// `/tmp`, say) is mounted after it. Otherwise the pod's order is kept.
pub fn mount_order(binds: Vec<Bind>) -> Vec<Bind> {
    let (shadowing, rest): (Vec<Bind>, Vec<Bind>) = binds.iter().cloned().partition(|b| {
        binds
            .iter()
            .any(|other| !std::ptr::eq(b, other) && other.source.starts_with(&b.target))
    });
    rest.into_iter().chain(shadowing).collect()
}

/// The `exec-container` half that runs inside the namespaces: mounts, identity, exec. Returns
/// only on failure.
pub fn exec_container(
    binds: &[String],
    uid: Option<u32>,
    gid: Option<u32>,
    workdir: &Path,
    argv: &[String],
) -> ProcessError {
    let parsed = match binds
        .iter()
        .map(|a| Bind::parse(a))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(b) => mount_order(b),
        Err(e) => return e,
    };
    for bind in parsed {
        if let Err(e) = mount(&[
            "--bind",
            &bind.source.to_string_lossy(),
            &bind.target.to_string_lossy(),
        ]) {
            return e;
        }
        if bind.read_only
            && let Err(e) = mount(&["-o", "remount,bind,ro", &bind.target.to_string_lossy()])
        {
            return e;
        }
    }
    let Some((program, args)) = argv.split_first() else {
        return ProcessError::Exec(String::new(), std::io::Error::other("empty command"));
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).current_dir(workdir);
    if let Some(gid) = gid {
        cmd.gid(gid);
    }
    if let Some(uid) = uid {
        cmd.uid(uid);
    }
    let err = cmd.exec();
    ProcessError::Exec(program.clone(), err)
}

fn mount(args: &[&str]) -> Result<(), ProcessError> {
    let out = std::process::Command::new("mount")
        .args(args)
        .output()
        .map_err(|e| ProcessError::Mount(args.join(" "), e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ProcessError::Mount(
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Exit code and signal of a finished process (`128 + signal` as the exit code when killed).
pub fn exit_info(status: ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(sig)) => (128 + sig, Some(sig)),
        (None, None) => (-1, None),
    }
}

fn pid_of(pid: i32) -> Option<Pid> {
    (pid > 1).then(|| Pid::from_raw(pid))
}

/// Sends SIGTERM to the process group led by `pid`.
pub fn term_group(pid: i32) {
    if let Some(p) = pid_of(pid) {
        let _ = killpg(p, Signal::SIGTERM);
    }
}

/// Sends SIGKILL to the process group led by `pid`.
pub fn kill_group(pid: i32) {
    if let Some(p) = pid_of(pid) {
        let _ = killpg(p, Signal::SIGKILL);
    }
}

/// Sends SIGKILL to one process.
pub fn kill_pid(pid: i32) {
    if let Some(p) = pid_of(pid) {
        let _ = kill(p, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_arguments_round_trip() {
        let b = Bind {
            source: "/s/v/config".into(),
            target: "/etc/tandem".into(),
            read_only: true,
        };
        assert_eq!(Bind::parse(&b.to_arg()).expect("parse"), b);
        assert!(Bind::parse("nodelimiter").is_err());
        assert!(Bind::parse("=/x").is_err());
    }

    #[test]
    fn exit_info_reports_signals_as_128_plus_signal() {
        assert_eq!(exit_info(ExitStatus::from_raw(3 << 8)), (3, None));
        assert_eq!(exit_info(ExitStatus::from_raw(9)), (137, Some(9)));
    }

    #[test]
    fn a_bind_over_the_state_dir_is_mounted_after_the_binds_from_it() {
        let b = |src: &str, dst: &str| Bind {
            source: src.into(),
            target: dst.into(),
            read_only: false,
        };
        let order = mount_order(vec![
            b("/tmp/state/pods/u/volumes/tmp", "/tmp"),
            b("/tmp/state/pods/u/volumes/config", "/etc/tandem"),
            b("/root/state/token", "/var/run/secrets/token"),
        ]);
        let targets: Vec<_> = order
            .iter()
            .map(|b| b.target.display().to_string())
            .collect();
        assert_eq!(targets, ["/etc/tandem", "/var/run/secrets/token", "/tmp"]);
    }
}
