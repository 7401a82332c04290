//! The kernel tier: Debian's own kernels booted under qemu's software emulation
//! (no KVM) with virtme-ng, each running a smoke subset of the end-to-end tests on this
//! machine's filesystem, or, where leaktrace must refuse, checking that it does so in
//! one line before loading anything.
//!
//! Setup downloads the kernels through a private apt configuration (the machine's own
//! sources are left alone), unpacks them under `~/.cache/leaktrace/kernels/RELEASE/`,
//! and copies their modules into `/lib/modules/RELEASE` (virtme-ng loads 9p and virtio
//! from there). A run leaves everything the guest wrote under
//! `target/kernel-tier/RELEASE/`: the console, each test's output and exit status.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{output, run, works};

/// What a kernel must do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Pass the smoke subset.
    Smoke,
    /// Lack bpf_loop: leaktrace refuses in one line and loads nothing.
    Refused,
}

/// A kernel series of the tier and the Debian suite that has it.
struct Series {
    series: &'static str,
    suite: &'static str,
    expect: Expect,
}

const SERIES: &[Series] = &[
    Series {
        series: "6.1",
        suite: "bookworm",
        expect: Expect::Smoke,
    },
    Series {
        series: "6.12",
        suite: "bookworm-backports",
        expect: Expect::Smoke,
    },
    Series {
        series: "5.10",
        suite: "bullseye",
        expect: Expect::Refused,
    },
];

/// The smoke subset: (test binary, test name). Exact bytes on a C fixture, Python
/// frames on Debian's python3.11, a verdict, and sampling, which on kernels before 6.13
/// checks the fallback from uprobe sessions to entry and return probes.
const SMOKE: &[(&str, &str)] = &[
    ("heap", "root_malloc_calloc_and_churn"),
    ("python", "root_python_debian_311"),
    ("verdict", "root_verdict_leak"),
    ("heap", "root_sampling_estimates_within_error"),
];

/// Each test inside the guest is killed after this (they take 16–26 s under emulation).
const TEST_LIMIT: Duration = Duration::from_secs(300);
/// Booting to the guest's ready marker takes ~15 s; a VM is killed this long past its
/// tests' limits.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// How long a VM may take to power off after its script wrote the done marker.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(60);
/// The opt-out, for local development only (CI ignores it).
pub const SKIP_VAR: &str = "LEAKTRACE_SKIP_KERNEL_TIER";
/// The exact start of leaktrace's refusal on a kernel without bpf_loop (then its release).
const REFUSAL: &str = "leaktrace: this kernel (";
const REFUSAL_LACKS: &str = ") lacks bpf_loop (Linux 5.17+), which leaktrace's stack walks need";
/// virtme-ng, as measured here.
const VIRTME_NG: &str = "virtme-ng==1.42";

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn cache() -> PathBuf {
    home().join(".cache/leaktrace")
}

fn kernels_dir() -> PathBuf {
    cache().join("kernels")
}

/// Whether the tier is skipped on request; says so, visibly, either way it matters.
pub fn skipped() -> bool {
    let set = std::env::var(SKIP_VAR).is_ok_and(|v| !v.is_empty() && v != "0");
    if !set {
        return false;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        eprintln!("xtask: {SKIP_VAR} is ignored in CI: the kernel tier runs");
        return false;
    }
    eprintln!(
        "xtask: ******** kernel tier SKIPPED ({SKIP_VAR} is set): leaktrace was not run on 6.1, 6.12 or 5.10 ********"
    );
    true
}

/// Debian packages the tier needs that are missing (installed by the caller with the rest).
pub fn missing_packages() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if which::which("qemu-system-x86_64").is_err() {
        missing.push("qemu-system-x86");
    }
    if which::which("depmod").is_err() && !Path::new("/usr/sbin/depmod").exists() {
        missing.push("kmod");
    }
    // virtme-ng's initramfs, when it needs one, is built from a static busybox.
    if !works(Command::new("dpkg").args(["-s", "busybox-static"])) {
        missing.push("busybox-static");
    }
    // The 5.10 check asserts with strace that nothing but the feature probe reached bpf(2).
    if which::which("strace").is_err() {
        missing.push("strace");
    }
    missing
}

/// The Python that installs virtme-ng: pyenv's (3.11 on these machines), whether or not
/// PATH has its shims, else `python3` on PATH (Debian's own refuses pip installs).
fn python() -> Result<PathBuf> {
    let pyenv = std::env::var_os("PYENV_ROOT").map_or_else(|| home().join(".pyenv"), PathBuf::from);
    [pyenv.join("shims/python3"), PathBuf::from("python3")]
        .into_iter()
        .find(|p| works(Command::new(p).args(["-m", "pip", "--version"])))
        .context("no python3 with pip (pyenv's or on PATH) to install virtme-ng with")
}

/// Where pip puts `vng` for [`python`], found by absolute path (not through PATH).
fn vng_path() -> Result<PathBuf> {
    let python = python()?;
    let scripts = output(Command::new(&python).args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ]))?;
    Ok(Path::new(scripts.trim()).join("vng"))
}

/// virtme-ng from PyPI, the kernels, and their modules; each only when missing.
pub fn setup() -> Result<()> {
    let vng = vng_path()?;
    if !works(Command::new(&vng).arg("--version")) {
        run(Command::new(python()?).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            VIRTME_NG,
        ]))?;
        if !works(Command::new(&vng).arg("--version")) {
            bail!(
                "pip installed {VIRTME_NG}, but {} does not run",
                vng.display()
            );
        }
    }
    let mut have: Vec<(&Series, String)> = Vec::new();
    let mut want: Vec<&Series> = Vec::new();
    for s in SERIES {
        match cached_release(s.series)? {
            Some(r) => have.push((s, r)),
            None => want.push(s),
        }
    }
    if !want.is_empty() {
        let apt = PrivateApt::new()?;
        apt.update()?;
        for s in want {
            let release = apt.newest(s)?;
            apt.unpack(&release)?;
            have.push((s, release));
        }
    }
    for (_, release) in &have {
        install_modules(release)?;
    }
    Ok(())
}

/// The newest release of `series` unpacked in the cache (its marker written last).
fn cached_release(series: &str) -> Result<Option<String>> {
    let dir = kernels_dir();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut found: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| in_series(n, series))
        .filter(|n| dir.join(n).join(".unpacked").exists())
        .collect();
    found.sort_by_key(|r| version_key(r));
    Ok(found.pop())
}

/// Whether kernel release `r` (e.g. "6.12.95+deb12-amd64") is of `series` ("6.12", not "6.1").
fn in_series(r: &str, series: &str) -> bool {
    r.strip_prefix(series)
        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
}

/// The numbers in a release, in order: "6.1.0-50-amd64" → [6, 1, 0, 50, 64].
fn version_key(r: &str) -> Vec<u64> {
    r.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Copies a kernel's modules into /lib/modules and indexes them, unless done.
fn install_modules(release: &str) -> Result<()> {
    let dest = Path::new("/lib/modules").join(release);
    if dest.join("modules.dep").exists() {
        return Ok(());
    }
    let src = kernels_dir()
        .join(release)
        .join("lib/modules")
        .join(release);
    fs::create_dir_all("/lib/modules").context("failed to create /lib/modules")?;
    let _ = fs::remove_dir_all(&dest);
    run(Command::new("cp").arg("-a").arg(&src).arg(&dest))?;
    run(Command::new("depmod").arg(release))
}

/// apt with its own sources, lists and cache under ~/.cache/leaktrace/apt: bookworm,
/// bookworm-backports and bullseye, never the machine's configuration.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new() -> Result<Self> {
        let dir = cache().join("apt");
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("failed to create {}", dir.join(sub).display()))?;
        }
        let mut sources = String::new();
        for suite in ["bookworm", "bookworm-backports", "bullseye"] {
            writeln!(
                sources,
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {suite} main"
            )?;
        }
        fs::write(dir.join("sources.list"), sources)?;
        Ok(Self { dir })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        c.args(["-o", &format!("Dir::Etc::sourcelist={}", d("sources.list"))])
            .args(["-o", "Dir::Etc::sourceparts=-"])
            .args(["-o", &format!("Dir::State::Lists={}", d("lists"))])
            .args(["-o", &format!("Dir::Cache={}", d("cache"))])
            .args(["-o", "APT::Sandbox::User=root"])
            .args(["-o", "Acquire::Languages=none"]);
        c
    }

    fn update(&self) -> Result<()> {
        run(self.cmd("apt-get").arg("update"))
    }

    /// The newest plain (not cloud, not rt) amd64 kernel release of a series.
    fn newest(&self, s: &Series) -> Result<String> {
        let names = output(
            self.cmd("apt-cache")
                .arg("pkgnames")
                .arg(format!("linux-image-{}.", s.series)),
        )?;
        let mut releases: Vec<String> = names
            .lines()
            .filter_map(|n| n.strip_prefix("linux-image-")?.strip_suffix("-unsigned"))
            .filter(|r| r.ends_with("-amd64") && !r.contains("-cloud-") && !r.contains("-rt-"))
            .filter(|r| in_series(r, s.series))
            .map(str::to_owned)
            .collect();
        releases.sort_by_key(|r| version_key(r));
        releases.pop().with_context(|| {
            format!(
                "Debian's {} has no linux-image-{}.*-amd64-unsigned",
                s.suite, s.series
            )
        })
    }

    /// Downloads `linux-image-RELEASE-unsigned` and unpacks it into the cache.
    fn unpack(&self, release: &str) -> Result<()> {
        let debs = self.dir.join("debs");
        for e in fs::read_dir(&debs)?.filter_map(Result::ok) {
            let _ = fs::remove_file(e.path());
        }
        run(self
            .cmd("apt-get")
            .arg("download")
            .arg(format!("linux-image-{release}-unsigned"))
            .current_dir(&debs))?;
        let deb = fs::read_dir(&debs)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", debs.display()))?;
        let dest = kernels_dir().join(release);
        let _ = fs::remove_dir_all(&dest);
        fs::create_dir_all(&dest)?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dest))?;
        if !dest
            .join("boot")
            .join(format!("vmlinuz-{release}"))
            .exists()
        {
            bail!("{} has no boot/vmlinuz-{release}", deb.display());
        }
        fs::write(dest.join(".unpacked"), format!("{}\n", deb.display()))?;
        fs::remove_file(&deb)?;
        Ok(())
    }
}

/// The test binaries cargo built, by target name (e.g. "heap" → target/debug/deps/heap-…).
fn test_binaries(cargo: Command) -> Result<HashMap<String, PathBuf>> {
    let mut cargo = cargo;
    // The same command as the host run, so nothing is rebuilt for other features.
    let out = output(cargo.args([
        "test",
        "--workspace",
        "--exclude",
        "leaktrace-ebpf",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut bins = HashMap::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["profile"]["test"] == true
            && v["target"]["kind"][0] == "test"
            && let (Some(name), Some(exe)) =
                (v["target"]["name"].as_str(), v["executable"].as_str())
        {
            bins.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(bins)
}

/// Runs the tier on the kernels of `only` (all when empty): each booted in turn.
pub fn run_tier(workspace: &Path, cargo: Command, leaktrace: &Path, only: &[String]) -> Result<()> {
    for o in only {
        if !SERIES.iter().any(|s| s.series == o) {
            bail!(
                "no kernel series {o} in the tier (it has {})",
                SERIES
                    .iter()
                    .map(|s| s.series)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    // Not found after setup: this machine cannot run the tier, and that must show.
    let qemu = which::which("qemu-system-x86_64")
        .context("qemu-system-x86_64 is missing after setup: the kernel tier cannot run")?;
    let vng = vng_path()?;
    if !works(Command::new(&vng).arg("--version")) {
        bail!(
            "{} does not run after setup: the kernel tier cannot run",
            vng.display()
        );
    }
    let bins = test_binaries(cargo)?;
    let mut smoke = Vec::new();
    for (bin, test) in SMOKE {
        let path = bins
            .get(*bin)
            .with_context(|| format!("cargo built no test binary `{bin}` (for {test})"))?;
        smoke.push((*test, path.clone()));
    }
    let mut passed = 0;
    let mut failures = Vec::new();
    for s in SERIES
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.series))
    {
        let release = cached_release(s.series)?.with_context(|| {
            format!(
                "no {} kernel in {} (cargo xtask setup downloads it)",
                s.series,
                kernels_dir().display()
            )
        })?;
        let dir = workspace.join("target/kernel-tier").join(&release);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let vm = Vm {
            release: &release,
            dir: &dir,
            vng: &vng,
            qemu: &qemu,
            workspace,
            leaktrace,
        };
        let started = Instant::now();
        let (n, mut failed) = match s.expect {
            Expect::Smoke => vm.smoke(&smoke)?,
            Expect::Refused => vm.refused()?,
        };
        let secs = started.elapsed().as_secs();
        let what = match s.expect {
            Expect::Smoke => format!("{n} of {} smoke tests passed", smoke.len()),
            Expect::Refused => {
                if failed.is_empty() {
                    "refused in one line, nothing loaded".into()
                } else {
                    "refusal check failed".into()
                }
            }
        };
        eprintln!(
            "xtask: kernel {release}: {what} in {secs} s (boot and tests under qemu without KVM); output in {}",
            dir.display()
        );
        passed += n;
        failures.append(&mut failed);
    }
    println!("kernels: {passed} passed, {} failed", failures.len());
    if !failures.is_empty() {
        bail!("the kernel tier failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// One boot of one kernel.
struct Vm<'a> {
    release: &'a str,
    dir: &'a Path,
    vng: &'a Path,
    qemu: &'a Path,
    workspace: &'a Path,
    leaktrace: &'a Path,
}

/// A shell word, single-quoted.
fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

impl Vm<'_> {
    /// The start of every guest script: the ready marker (with the guest's release),
    /// the filesystems the probes use, and the environment `cargo xtask test` gives.
    fn preamble(&self) -> String {
        let d = quote(self.dir);
        format!(
            "#!/bin/bash\n\
             D={d}\n\
             uname -r > \"$D/ready\"\n\
             mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing\n\
             mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug\n\
             mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
             mount > \"$D/mounts\"\n\
             export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
             export LEAKTRACE_BIN={} RUST_BACKTRACE=1\n\
             cd {}\n",
            quote(self.leaktrace),
            quote(&self.workspace.join("tests")),
        )
    }

    /// Boots the kernel with `script` and waits for it within `limit`; killed past it.
    /// Whether the script wrote its done marker.
    fn boot(&self, script: &str, limit: Duration) -> Result<bool> {
        let path = self.dir.join("guest.sh");
        fs::write(&path, script)?;
        run(Command::new("chmod").arg("+x").arg(&path))?;
        let console = fs::File::create(self.dir.join("console.log"))?;
        let vmlinuz = kernels_dir()
            .join(self.release)
            .join("boot")
            .join(format!("vmlinuz-{}", self.release));
        let mut cmd = Command::new(self.vng);
        cmd.arg("--run")
            .arg(&vmlinuz)
            .args(["--disable-kvm", "--memory", "4G", "--cpus", "2"])
            // The kernel's messages on the console (console.log): a panic shows there.
            .arg("--verbose")
            .arg("--qemu")
            .arg(self.qemu)
            .arg("--rwdir")
            .arg(self.dir)
            .arg("--")
            .arg(&path)
            .current_dir(self.workspace)
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            // Its own process group, so a hung VM is killed with qemu and all.
            .process_group(0);
        eprintln!(
            "xtask: booting {} under qemu (no KVM): {cmd:?}",
            self.release
        );
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to run {}", self.vng.display()))?;
        let started = Instant::now();
        let done = self.dir.join("done");
        let mut done_at = None;
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if done_at.is_none() && done.exists() {
                done_at = Some(Instant::now());
            }
            let over =
                started.elapsed() > limit || done_at.is_some_and(|t| t.elapsed() > SHUTDOWN_LIMIT);
            if over {
                if done_at.is_none() {
                    eprintln!(
                        "xtask: kernel {}: the VM ran past {} s; killing it",
                        self.release,
                        limit.as_secs()
                    );
                }
                // SAFETY: signalling the process group we created for this child.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(done.exists())
    }

    /// The guest's ready marker, checked: it booted, and it is the kernel we meant.
    fn check_ready(&self) -> Option<String> {
        match fs::read_to_string(self.dir.join("ready")) {
            Ok(r) if r.trim() == self.release => None,
            Ok(r) => Some(format!(
                "kernel {}: the guest runs {:?}, not the kernel asked for",
                self.release,
                r.trim()
            )),
            Err(_) => Some(format!(
                "kernel {}: the guest never wrote its ready marker (qemu could not boot it, or the script never ran); console: {}",
                self.release,
                tail(&self.dir.join("console.log"), 15)
            )),
        }
    }

    /// Boots with the smoke tests: (tests passed, failures).
    fn smoke(&self, tests: &[(&str, PathBuf)]) -> Result<(usize, Vec<String>)> {
        let mut script = self.preamble();
        let limit = TEST_LIMIT.as_secs();
        for (name, bin) in tests {
            writeln!(
                script,
                "S=$(date +%s)\n\
                 timeout -k 10 {limit} {} --exact {name} --test-threads=1 --nocapture > \"$D/{name}.out\" 2>&1\n\
                 echo $? > \"$D/{name}.status\"\n\
                 echo $(( $(date +%s) - S )) > \"$D/{name}.secs\"",
                quote(bin)
            )?;
        }
        script.push_str("echo done > \"$D/done\"\n");
        let vm_limit = BOOT_LIMIT + TEST_LIMIT * tests.len() as u32;
        // A VM that dies before its done marker is booted again, up to twice; its console
        // is kept. Under qemu without KVM, 6.12 panics now and then with "Oops: int3"
        // while the kernel patches its own text (a static key toggled): qemu's handling
        // of cross-modifying code racing text_poke, seen on two boots in a row once.
        const BOOTS: u32 = 3;
        for attempt in 1..=BOOTS {
            if self.boot(&script, vm_limit)? || attempt == BOOTS {
                break;
            }
            let kept = self.dir.join("console-died.log");
            let _ = fs::rename(self.dir.join("console.log"), &kept);
            eprintln!(
                "xtask: kernel {}: the VM ended before the tests did; booting it again. Its console ({}):\n{}",
                self.release,
                kept.display(),
                indent(&tail(&kept, 30))
            );
            for (name, _) in tests {
                for ext in ["out", "status", "secs"] {
                    let _ = fs::remove_file(self.dir.join(format!("{name}.{ext}")));
                }
            }
            let _ = fs::remove_file(self.dir.join("ready"));
        }
        if let Some(f) = self.check_ready() {
            return Ok((0, vec![f]));
        }
        let mut passed = 0;
        let mut failures = Vec::new();
        let mut times = Vec::new();
        for (name, _) in tests {
            if let Ok(secs) = fs::read_to_string(self.dir.join(format!("{name}.secs"))) {
                times.push(format!("{name} {} s", secs.trim()));
            }
            let out = self.dir.join(format!("{name}.out"));
            let text = fs::read_to_string(&out).unwrap_or_default();
            let status = fs::read_to_string(self.dir.join(format!("{name}.status")));
            let why = match status.as_deref().map(str::trim) {
                Err(_) if !out.exists() => {
                    Some("never started (the VM was killed or died before it)".to_owned())
                }
                Err(_) => Some("did not finish (the VM was killed or died)".to_owned()),
                Ok("0") if text.contains("test result: ok. 1 passed") => None,
                Ok("0") => Some("ran no test (renamed?)".to_owned()),
                Ok("124" | "137") => Some(format!("timed out after {limit} s")),
                Ok(code) => Some(format!("failed (exit status {code})")),
            };
            match why {
                None => passed += 1,
                Some(why) => failures.push(format!(
                    "kernel {}: {name} {why}; {}:\n{}",
                    self.release,
                    out.display(),
                    indent(&tail(&out, 40))
                )),
            }
        }
        eprintln!("xtask: kernel {}: {}", self.release, times.join(", "));
        Ok((passed, failures))
    }

    /// Boots with leaktrace attached to a sleeping process under strace: it must exit
    /// non-zero with the one refusal line, print nothing else, and make no bpf(2) call but
    /// the feature probe's; the target must live on. (1 or 0 passed, failures.)
    fn refused(&self) -> Result<(usize, Vec<String>)> {
        let mut script = self.preamble();
        script.push_str(
            "sleep 600 & TARGET=$!\n\
             timeout -k 10 120 strace -f -qq -e trace=bpf -o \"$D/refusal.strace\" \"$LEAKTRACE_BIN\" --pid $TARGET --duration 5 \
             > \"$D/refusal.stdout\" 2> \"$D/refusal.stderr\"\n\
             echo $? > \"$D/refusal.status\"\n\
             kill -0 $TARGET && echo alive > \"$D/refusal.target\"\n\
             kill $TARGET\n\
             echo done > \"$D/done\"\n",
        );
        self.boot(&script, BOOT_LIMIT + Duration::from_secs(120))?;
        if let Some(f) = self.check_ready() {
            return Ok((0, vec![f]));
        }
        let read = |name: &str| fs::read_to_string(self.dir.join(name));
        let mut why = Vec::new();
        let stderr = read("refusal.stderr").unwrap_or_default();
        match read("refusal.status").as_deref().map(str::trim) {
            Err(_) => why.push("leaktrace did not finish".to_owned()),
            Ok("0") => why.push("leaktrace exited 0".to_owned()),
            Ok(_) => {}
        }
        let want = format!("{REFUSAL}{}{REFUSAL_LACKS}", self.release);
        let lines: Vec<&str> = stderr.lines().collect();
        if lines.len() != 1 || !lines[0].starts_with(&want) {
            why.push(format!("stderr is not the one line {want:?}…: {stderr:?}"));
        }
        if !read("refusal.stdout").unwrap_or_default().is_empty() {
            why.push("leaktrace printed on stdout".to_owned());
        }
        // Only the probe: its BTF, and one program load the kernel refused.
        let strace = read("refusal.strace").unwrap_or_default();
        let calls: Vec<&str> = strace.lines().filter(|l| l.contains("bpf(")).collect();
        let probe_refused = calls
            .iter()
            .filter(|l| l.contains("bpf(BPF_PROG_LOAD") && l.contains("= -1"))
            .count();
        let other = calls.iter().any(|l| {
            !(l.contains("bpf(BPF_BTF_LOAD")
                || l.contains("bpf(BPF_PROG_LOAD") && l.contains("= -1"))
        });
        if probe_refused != 1 || other {
            why.push(format!(
                "bpf(2) calls were not just the refused feature probe: {calls:#?}"
            ));
        }
        if read("refusal.target").is_err() {
            why.push("the target process did not survive".to_owned());
        }
        if why.is_empty() {
            eprintln!("xtask: kernel {}: {}", self.release, stderr.trim());
            Ok((1, Vec::new()))
        } else {
            Ok((
                0,
                vec![format!(
                    "kernel {}: the refusal check failed: {}",
                    self.release,
                    why.join("; ")
                )],
            ))
        }
    }
}

/// The last `n` lines of a file (or why it could not be read).
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_and_versions() {
        assert!(in_series("6.1.0-50-amd64", "6.1"));
        assert!(!in_series("6.12.95+deb12-amd64", "6.1"));
        assert!(in_series("6.12.95+deb12-amd64", "6.12"));
        assert!(in_series("5.10.0-32-amd64", "5.10"));
        let mut r = ["6.1.0-9-amd64", "6.1.0-50-amd64", "6.1.0-47-amd64"];
        r.sort_by_key(|r| version_key(r));
        assert_eq!(r.last(), Some(&"6.1.0-50-amd64"));
    }
}
