//! Kernels for the matrix: Debian's linux-image packages, fetched with `apt-get download`
//! through a private apt configuration (the machine's own is never touched), cached, unpacked.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Where Debian keeps the kernels the default matrix uses: 5.10 in bullseye, 6.1 and 6.12 in
/// bookworm (6.12 through bookworm-security), the newest ones in the backports.
const SOURCES: &str = "\
# Written by `cargo xtask vmtest`: the suites its kernels come from. Used only through
# `-o Dir::Etc::sourcelist=...`; the machine's own apt configuration stays as it is.
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

/// Where newer Debian kernels (7.x) split linux-image up: vmlinuz in linux-binary, modules in
/// linux-modules, modules.builtin and the config in linux-base-RELEASE.
const PARTS: &[&str] = &["linux-binary-", "linux-modules-", "linux-base-"];

/// Package lists older than this are refreshed before a kernel is resolved.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// What `--kernel` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    /// A Debian kernel series such as 5.10: the newest package of it in the private suites.
    Series(String),
    /// The newest kernel in the private suites (a backport).
    Newest,
    /// A linux-image .deb on disk.
    Deb(PathBuf),
    /// A kernel image (bzImage) on disk, with its modules where Debian would put them.
    Vmlinuz(PathBuf),
}

impl Spec {
    pub fn parse(text: &str) -> anyhow::Result<Spec> {
        if text == "newest" {
            return Ok(Spec::Newest);
        }
        let path = Path::new(text);
        if path.is_file() {
            let path =
                std::path::absolute(path).with_context(|| format!("finding the kernel {text}"))?;
            return Ok(if text.ends_with(".deb") {
                Spec::Deb(path)
            } else {
                Spec::Vmlinuz(path)
            });
        }
        let is_series = text.split('.').count() == 2
            && text
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
        if is_series {
            return Ok(Spec::Series(text.to_owned()));
        }
        bail!(
            "kernel `{text}` is neither a Debian kernel series (like 6.1), `newest`, nor an \
             existing .deb or vmlinuz file"
        )
    }
}

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// What the user asked for, for the report: "5.10", "newest", a file name.
    pub label: String,
    /// `uname -r` of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The modules tree, absent for a kernel with everything built in.
    pub modules: Option<ModuleTree>,
    /// The Debian package and version it came from, when it came from one.
    pub package: Option<String>,
}

/// A kernel's modules where kmod looks for them: `base/lib/modules/RELEASE`, with modules.dep.
#[derive(Clone, Debug)]
pub struct ModuleTree {
    /// What `modprobe -d` and `depmod -b` take.
    pub base: PathBuf,
    /// `base/lib/modules/RELEASE`.
    pub dir: PathBuf,
}

/// Gets the kernel SPEC names into `vmtest_dir` (cache/ for packages, kernels/ unpacked).
pub fn fetch(spec: &Spec, label: &str, vmtest_dir: &Path) -> anyhow::Result<Kernel> {
    let cache = vmtest_dir.join("cache");
    let kernels = vmtest_dir.join("kernels");
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("creating the package cache {}", cache.display()))?;
    match spec {
        Spec::Series(_) | Spec::Newest => {
            let apt = PrivateApt::prepare(&vmtest_dir.join("apt"))?;
            let packages = apt.resolve(spec)?;
            let debs = packages
                .iter()
                .map(|package| apt.download(package, &cache))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let image = &packages[0];
            let release = release_of(&image.name)?;
            let mut kernel = unpack(&debs, &release, &kernels)?;
            kernel.label = label.to_owned();
            kernel.package = Some(format!("{} {}", image.name, image.version));
            Ok(kernel)
        }
        Spec::Deb(deb) => {
            let fields = cmd::output(
                Command::new("dpkg-deb")
                    .args(["-f"])
                    .arg(deb)
                    .args(["Package", "Version", "Depends"]),
                &format!("reading the control fields of {}", deb.display()),
            )?;
            let stanza = Stanza::parse_all(&fields)
                .into_iter()
                .next()
                .unwrap_or_default();
            let release = release_of(&stanza.package)?;
            let mut debs = vec![deb.clone()];
            // Newer Debian kernels split linux-image up (see PARTS): look for the parts beside
            // the .deb, then in the cache.
            for part in stanza.exact_depends(PARTS) {
                let file = part.file_name();
                let beside = deb.with_file_name(&file);
                let found = [beside, cache.join(&file)]
                    .into_iter()
                    .find(|p| p.is_file());
                match found {
                    Some(path) => debs.push(path),
                    None => bail!(
                        "{} needs {} {} (vmlinuz or modules live there); put {file} beside it",
                        deb.display(),
                        part.name,
                        part.version
                    ),
                }
            }
            let mut kernel = unpack(&debs, &release, &kernels)?;
            kernel.label = label.to_owned();
            kernel.package = Some(format!("{} {}", stanza.package, stanza.version));
            Ok(kernel)
        }
        Spec::Vmlinuz(vmlinuz) => {
            let release = bzimage_release(vmlinuz)?;
            let modules = modules_for_vmlinuz(vmlinuz, &release)?;
            Ok(Kernel {
                label: label.to_owned(),
                release,
                vmlinuz: vmlinuz.clone(),
                modules,
                package: None,
            })
        }
    }
}

/// "linux-image-6.1.0-56-amd64" -> "6.1.0-56-amd64", the kernel's `uname -r`.
fn release_of(image_package: &str) -> anyhow::Result<String> {
    match image_package.strip_prefix("linux-image-") {
        Some(release) if release.starts_with(|c: char| c.is_ascii_digit()) => {
            Ok(release.to_owned())
        }
        _ => bail!("{image_package} is not a Debian linux-image-RELEASE package"),
    }
}

/// One package at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
}

impl Package {
    /// The name `apt-get download` gives the file (an epoch's colon is URL-encoded).
    fn file_name(&self) -> String {
        format!(
            "{}_{}_amd64.deb",
            self.name,
            self.version.replace(':', "%3a")
        )
    }
}

/// One record of `apt-cache show` or `dpkg-deb -f`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stanza {
    pub package: String,
    pub version: String,
    pub depends: String,
}

impl Stanza {
    pub fn parse_all(text: &str) -> Vec<Stanza> {
        let mut stanzas = Vec::new();
        let mut current = Stanza::default();
        for line in text.lines().chain(std::iter::once("")) {
            if line.trim().is_empty() {
                if !current.package.is_empty() {
                    stanzas.push(std::mem::take(&mut current));
                }
                continue;
            }
            if let Some((key, value)) = line.split_once(':') {
                match key {
                    "Package" => current.package = value.trim().to_owned(),
                    "Version" => current.version = value.trim().to_owned(),
                    "Depends" => current.depends = value.trim().to_owned(),
                    _ => {}
                }
            }
        }
        stanzas
    }

    /// Dependencies pinned to an exact version (`name (= version)`) whose name starts with
    /// one of `prefixes`: how a Debian kernel metapackage names the real package.
    pub fn exact_depends(&self, prefixes: &[&str]) -> Vec<Package> {
        self.depends
            .split(',')
            .filter_map(|alternatives| alternatives.split('|').next())
            .filter_map(|item| {
                let (name, constraint) = item.trim().split_once(' ')?;
                let version = constraint
                    .trim()
                    .strip_prefix("(=")?
                    .strip_suffix(')')?
                    .trim();
                prefixes
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
                    .then(|| Package {
                        name: name.to_owned(),
                        version: version.to_owned(),
                    })
            })
            .collect()
    }
}

/// apt-get and apt-cache with their own sources list, lists, status and cache under DIR.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn prepare(dir: &Path) -> anyhow::Result<PrivateApt> {
        for sub in [
            "sources.list.d",
            "preferences.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating the private apt directory {}", dir.display()))?;
        }
        let sources = dir.join("sources.list");
        let changed = std::fs::read_to_string(&sources).ok().as_deref() != Some(SOURCES);
        if changed {
            std::fs::write(&sources, SOURCES)
                .with_context(|| format!("writing {}", sources.display()))?;
        }
        let status = dir.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "").with_context(|| format!("writing {}", status.display()))?;
        }
        let apt = PrivateApt {
            dir: dir.to_owned(),
        };
        if changed || apt.lists_age().is_none_or(|age| age > LISTS_MAX_AGE) {
            apt.update()?;
        }
        Ok(apt)
    }

    fn options(&self) -> Vec<String> {
        let dir = |sub: &str| self.dir.join(sub).display().to_string();
        [
            ("Dir::Etc::sourcelist", dir("sources.list")),
            ("Dir::Etc::sourceparts", dir("sources.list.d")),
            ("Dir::Etc::preferences", dir("preferences")),
            ("Dir::Etc::preferencesparts", dir("preferences.d")),
            ("Dir::State", dir("state")),
            ("Dir::State::status", dir("state/status")),
            ("Dir::Cache", dir("cache")),
            ("Acquire::Languages", "none".to_owned()),
            // Only the Packages indexes: no AppStream metadata for these suites.
            (
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
                "false".to_owned(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled",
                "false".to_owned(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled",
                "false".to_owned(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled",
                "false".to_owned(),
            ),
            // The files are ours; apt's _apt user could not write these directories.
            ("APT::Sandbox::User", "root".to_owned()),
        ]
        .into_iter()
        .flat_map(|(key, value)| ["-o".to_owned(), format!("{key}={value}")])
        .collect()
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .args(self.options())
            .env("DEBIAN_FRONTEND", "noninteractive");
        command
    }

    /// How old the newest package list is; None when there is none.
    fn lists_age(&self) -> Option<Duration> {
        std::fs::read_dir(self.dir.join("state/lists"))
            .ok()?
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().contains("_Packages"))
            .filter_map(|entry| entry.metadata().ok()?.modified().ok())
            .max()
            .map(|newest| SystemTime::now().duration_since(newest).unwrap_or_default())
    }

    fn update(&self) -> anyhow::Result<()> {
        println!(
            "vmtest: updating the private package lists ({})",
            self.dir.display()
        );
        let result = cmd::output(
            self.command("apt-get").args(["update", "-q"]),
            "updating the private apt package lists for the kernel matrix",
        );
        match result {
            Ok(_) => Ok(()),
            // Offline, with lists from an earlier run: go on with those.
            Err(error) if self.lists_age().is_some() => {
                println!("vmtest: {error:#}; using the lists of an earlier run");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Every version of PACKAGE the private suites have; none when apt has never heard of it.
    fn stanzas(&self, package: &str) -> anyhow::Result<Vec<Stanza>> {
        let mut command = self.command("apt-cache");
        command.args(["show", package]);
        let output = command
            .output()
            .with_context(|| format!("asking apt-cache about {package}"))?;
        // apt-cache exits 100 for a name it does not know; that is "no versions".
        if !output.status.success() {
            return Ok(Vec::new());
        }
        Ok(Stanza::parse_all(&String::from_utf8_lossy(&output.stdout)))
    }

    /// The packages that make up the kernel SPEC names: the linux-image package first, then
    /// linux-binary/linux-modules where Debian splits them out (7.x).
    fn resolve(&self, spec: &Spec) -> anyhow::Result<Vec<Package>> {
        let mut metas = self.stanzas("linux-image-amd64")?;
        if let Spec::Series(series) = spec {
            metas.extend(self.stanzas(&format!("linux-image-{series}-amd64"))?);
        }
        let wanted = |stanza: &Stanza| match spec {
            Spec::Series(series) => upstream(&stanza.version)
                .strip_prefix(series.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.')),
            _ => true,
        };
        let Some(meta) = metas
            .iter()
            .filter(|stanza| wanted(stanza))
            .max_by(|a, b| compare_versions(&a.version, &b.version))
        else {
            let known: Vec<String> = metas
                .iter()
                .map(|s| upstream(&s.version).to_owned())
                .collect();
            bail!(
                "no Debian kernel {} in the private suites (they have {}); see {}",
                match spec {
                    Spec::Series(series) => series.as_str(),
                    _ => "at all",
                },
                known.join(", "),
                self.dir.join("sources.list").display()
            );
        };
        let Some(image) = meta.exact_depends(&["linux-image-"]).into_iter().next() else {
            bail!(
                "{} {} names no linux-image package: {}",
                meta.package,
                meta.version,
                meta.depends
            );
        };
        let mut packages = vec![image.clone()];
        let image_stanza = self
            .stanzas(&image.name)?
            .into_iter()
            .find(|stanza| stanza.version == image.version)
            .with_context(|| format!("apt-cache does not show {} {}", image.name, image.version))?;
        packages.extend(image_stanza.exact_depends(PARTS));
        Ok(packages)
    }

    /// PACKAGE's .deb in CACHE, downloaded unless an earlier run did.
    fn download(&self, package: &Package, cache: &Path) -> anyhow::Result<PathBuf> {
        let file = cache.join(package.file_name());
        if file.is_file() {
            return Ok(file);
        }
        println!("vmtest: downloading {} {}", package.name, package.version);
        // apt-get download writes into the current directory: a fresh one, so that an
        // interrupted download never looks like a cached package.
        let partial = cache.join(format!("partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        cmd::output(
            self.command("apt-get")
                .args(["download", "-q"])
                .arg(format!("{}={}", package.name, package.version))
                .current_dir(&partial),
            &format!("downloading {} {}", package.name, package.version),
        )?;
        std::fs::rename(partial.join(package.file_name()), &file).with_context(|| {
            format!(
                "apt-get download did not leave {} in {}",
                package.file_name(),
                partial.display()
            )
        })?;
        let _ = std::fs::remove_dir_all(&partial);
        Ok(file)
    }
}

/// The upstream part of a Debian version: "6.1.192-2" -> "6.1.192".
fn upstream(version: &str) -> &str {
    let without_epoch = version.split_once(':').map_or(version, |(_, rest)| rest);
    without_epoch
        .rsplit_once('-')
        .map_or(without_epoch, |(upstream, _)| upstream)
}

/// Debian's version order (deb-version(7)): epoch, then upstream and revision compared as
/// alternating non-digit and digit runs, `~` sorting before everything, even the end.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(version: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match version.split_once(':') {
            Some((epoch, rest)) => (epoch.parse().unwrap_or(0), rest),
            None => (0, version),
        };
        let (upstream, revision) = rest.rsplit_once('-').unwrap_or((rest, ""));
        (epoch, upstream, revision)
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            Some(b'~') => -1,
            None => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(c) => i32::from(c) + 256,
        }
    }
    fn part(mut a: &[u8], mut b: &[u8]) -> Ordering {
        while !a.is_empty() || !b.is_empty() {
            let a_text = a.iter().take_while(|c| !c.is_ascii_digit()).count();
            let b_text = b.iter().take_while(|c| !c.is_ascii_digit()).count();
            for i in 0..a_text.max(b_text) {
                let ca = (i < a_text).then(|| a[i]);
                let cb = (i < b_text).then(|| b[i]);
                match order(ca).cmp(&order(cb)) {
                    Ordering::Equal => {}
                    other => return other,
                }
            }
            a = &a[a_text..];
            b = &b[b_text..];
            let a_digits = a.iter().take_while(|c| c.is_ascii_digit()).count();
            let b_digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
            let number = |digits: &[u8]| -> u128 {
                std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            };
            match number(&a[..a_digits]).cmp(&number(&b[..b_digits])) {
                Ordering::Equal => {}
                other => return other,
            }
            a = &a[a_digits..];
            b = &b[b_digits..];
        }
        Ordering::Equal
    }
    let (a, b) = (split(a), split(b));
    a.0.cmp(&b.0)
        .then_with(|| part(a.1.as_bytes(), b.1.as_bytes()))
        .then_with(|| part(a.2.as_bytes(), b.2.as_bytes()))
}

/// Unpacks DEBS into KERNELS/RELEASE once (dpkg-deb -x, then depmod), and finds vmlinuz.
fn unpack(debs: &[PathBuf], release: &str, kernels: &Path) -> anyhow::Result<Kernel> {
    let root = kernels.join(release);
    // The marker names the packages unpacked, so that a different set unpacks afresh.
    let packages: String = debs
        .iter()
        .map(|deb| {
            format!(
                "{}\n",
                deb.file_name().unwrap_or_default().to_string_lossy()
            )
        })
        .collect();
    if std::fs::read_to_string(root.join(".ready")).ok().as_deref() != Some(packages.as_str()) {
        let partial = kernels.join(format!("{release}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        for deb in debs {
            cmd::run(
                Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial),
                &format!("unpacking {}", deb.display()),
            )?;
        }
        // kmod looks in BASE/lib/modules; 7.x packages put modules under usr/lib/modules.
        if !partial.join("lib").exists() && partial.join("usr/lib/modules").is_dir() {
            std::os::unix::fs::symlink("usr/lib", partial.join("lib"))
                .with_context(|| format!("linking lib -> usr/lib in {}", partial.display()))?;
        }
        if partial.join("lib/modules").join(release).is_dir() {
            // Debian runs depmod in postinst, so the package has no modules.dep.
            cmd::output(
                Command::new("depmod").arg("-b").arg(&partial).arg(release),
                &format!("indexing the modules of {release} (depmod)"),
            )?;
        }
        std::fs::write(partial.join(".ready"), &packages)
            .with_context(|| format!("marking {} complete", partial.display()))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&partial, &root)
            .with_context(|| format!("moving {} to {}", partial.display(), root.display()))?;
    }
    let candidates = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        root.join("lib/modules").join(release).join("vmlinuz"),
        root.join("usr/lib/modules").join(release).join("vmlinuz"),
    ];
    let Some(vmlinuz) = candidates.iter().find(|path| path.is_file()) else {
        bail!(
            "no vmlinuz in the packages of {release} (looked at {})",
            candidates.map(|p| p.display().to_string()).join(", ")
        );
    };
    let dir = root.join("lib/modules").join(release);
    Ok(Kernel {
        label: String::new(),
        release: release.to_owned(),
        vmlinuz: vmlinuz.clone(),
        modules: dir.is_dir().then(|| ModuleTree {
            base: root.clone(),
            dir,
        }),
        package: None,
    })
}

/// The release a bzImage was built as: the boot protocol's kernel_version string
/// (Documentation/arch/x86/boot.rst: a pointer at 0x20e, offset by 0x200).
fn bzimage_release(vmlinuz: &Path) -> anyhow::Result<String> {
    let image = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let header = image.get(0x202..0x206);
    if header != Some(b"HdrS".as_slice()) {
        bail!(
            "{} is not an x86 bzImage (no HdrS header)",
            vmlinuz.display()
        );
    }
    let pointer = u16::from_le_bytes([image[0x20e], image[0x20f]]) as usize + 0x200;
    let text = image.get(pointer..).unwrap_or_default();
    let end = text.iter().position(|&b| b == 0 || b == b' ').unwrap_or(0);
    let release = String::from_utf8_lossy(&text[..end.min(256)]).into_owned();
    if release.is_empty() {
        bail!("{} carries no kernel version string", vmlinuz.display());
    }
    Ok(release)
}

/// The modules of a bare vmlinuz: beside it (7.x layout), in an unpacked package around it,
/// or in the machine's /lib/modules; none for a kernel with everything built in.
fn modules_for_vmlinuz(vmlinuz: &Path, release: &str) -> anyhow::Result<Option<ModuleTree>> {
    let dir = vmlinuz.parent().unwrap_or(Path::new("/"));
    let mut bases = Vec::new();
    if dir.file_name().is_some_and(|name| name == release) {
        // BASE/lib/modules/RELEASE/vmlinuz
        bases.extend(dir.ancestors().nth(3).map(Path::to_owned));
    }
    bases.extend(dir.parent().map(Path::to_owned));
    bases.push(PathBuf::from("/"));
    for base in bases {
        let modules = base.join("lib/modules").join(release);
        if modules.join("modules.dep").is_file() {
            return Ok(Some(ModuleTree { base, dir: modules }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_series_newest_and_files() {
        assert_eq!(Spec::parse("5.10").unwrap(), Spec::Series("5.10".into()));
        assert_eq!(Spec::parse("newest").unwrap(), Spec::Newest);
        assert!(Spec::parse("6").is_err());
        assert!(Spec::parse("6.1.0").is_err());
        assert!(Spec::parse("/nonexistent/vmlinuz").is_err());
    }

    #[test]
    fn debian_versions_order_like_dpkg() {
        use Ordering::*;
        let cases = [
            ("6.1.192-2", "6.1.176-1", Greater),
            ("6.12.117-1~deb12u1", "6.12.95-1~bpo12+1", Greater),
            ("7.3.4-1~bpo13+1", "7.3.4-1", Less),
            ("1.0~rc1", "1.0", Less),
            ("1:1.0", "2.0", Greater),
            ("5.10.262-1", "5.10.262-1", Equal),
            ("1.0a", "1.0+", Less),
        ];
        for (a, b, expected) in cases {
            assert_eq!(compare_versions(a, b), expected, "{a} vs {b}");
        }
    }

    #[test]
    fn metapackages_name_the_image_and_its_parts() {
        let text = "Package: linux-image-amd64\nVersion: 7.3.4-1~bpo13+1\nDepends: \
                    linux-base-amd64 (= 7.3.4-1~bpo13+1), linux-image-7.3.4+deb13-amd64 (= \
                    7.3.4-1~bpo13+1), linux-modules-amd64 (= 7.3.4-1~bpo13+1)\n\nPackage: \
                    linux-image-7.3.4+deb13-amd64\nVersion: 7.3.4-1~bpo13+1\nDepends: dracut | \
                    initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                    linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), \
                    linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n";
        let stanzas = Stanza::parse_all(text);
        assert_eq!(stanzas.len(), 2);
        assert_eq!(
            stanzas[0].exact_depends(&["linux-image-"]),
            vec![Package {
                name: "linux-image-7.3.4+deb13-amd64".into(),
                version: "7.3.4-1~bpo13+1".into()
            }]
        );
        let parts: Vec<String> = stanzas[1]
            .exact_depends(&["linux-binary-", "linux-modules-"])
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            parts,
            [
                "linux-binary-7.3.4+deb13-amd64",
                "linux-modules-7.3.4+deb13-amd64"
            ]
        );
        assert_eq!(upstream(&stanzas[0].version), "7.3.4");
        assert_eq!(
            release_of("linux-image-6.1.0-56-amd64").unwrap(),
            "6.1.0-56-amd64"
        );
        assert!(release_of("linux-image-amd64").is_err());
    }
}
