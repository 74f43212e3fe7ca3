//! Which of a kernel's modules to load, in which order: modules.dep and modules.builtin read
//! the way modprobe reads them, for the few modules the initramfs must insmod itself.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The kernel's module index.
pub struct ModuleIndex {
    /// Module name -> (file relative to the modules directory, names it depends on).
    modules: HashMap<String, (PathBuf, Vec<String>)>,
    builtin: HashSet<String>,
}

/// What loading some modules takes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadPlan {
    /// Module files (relative to the modules directory), dependencies first.
    pub files: Vec<PathBuf>,
    /// Asked-for modules the kernel has built in: nothing to load.
    pub builtin: Vec<String>,
    /// Asked-for modules this kernel has neither as a module nor built in.
    pub absent: Vec<String>,
}

/// modprobe's spelling: `nf-tables` and `nf_tables` are the same module.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// "kernel/fs/9p/9p.ko.xz" -> "9p".
fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    canonical(file.split(".ko").next().unwrap_or(file))
}

impl ModuleIndex {
    pub fn read(dir: &Path) -> anyhow::Result<ModuleIndex> {
        let dep = std::fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("reading {}/modules.dep", dir.display()))?;
        // A kernel without modules.builtin has nothing built in that we would ask for.
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        Ok(ModuleIndex::parse(&dep, &builtin))
    }

    pub fn parse(dep: &str, builtin: &str) -> ModuleIndex {
        let modules = dep
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(file, deps)| {
                let deps = deps.split_whitespace().map(name_of).collect();
                (name_of(file), (PathBuf::from(file), deps))
            })
            .collect();
        let builtin = builtin.lines().map(name_of).collect();
        ModuleIndex { modules, builtin }
    }

    pub fn has(&self, name: &str) -> bool {
        let name = canonical(name);
        self.modules.contains_key(&name) || self.builtin.contains(&name)
    }

    /// The files to insmod, in order, so that WANTED are loaded.
    pub fn load_plan(&self, wanted: &[&str]) -> anyhow::Result<LoadPlan> {
        let mut plan = LoadPlan::default();
        let mut done = BTreeSet::new();
        for name in wanted {
            let name = canonical(name);
            if self.modules.contains_key(&name) {
                self.visit(&name, &mut done, &mut Vec::new(), &mut plan.files)?;
            } else if self.builtin.contains(&name) {
                plan.builtin.push(name);
            } else {
                plan.absent.push(name);
            }
        }
        Ok(plan)
    }

    /// Depth first: a module's dependencies go before it.
    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        files: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|seen| seen == name) {
            bail!(
                "modules.dep has a dependency cycle: {} -> {name}",
                path.join(" -> ")
            );
        }
        let Some((file, deps)) = self.modules.get(name) else {
            // A dependency that is built in needs no loading.
            if self.builtin.contains(name) {
                return Ok(());
            }
            bail!("modules.dep names {name} as a dependency but has no entry for it");
        };
        path.push(name.to_owned());
        for dep in deps {
            self.visit(dep, done, path, files)?;
        }
        path.pop();
        done.insert(name.to_owned());
        files.push(file.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/sched/sch_ingress.ko.xz:
";

    #[test]
    fn dependencies_load_first_and_once() {
        let index = ModuleIndex::parse(DEP, "kernel/drivers/virtio/virtio_pci.ko\n");
        let plan = index
            .load_plan(&[
                "virtio_pci",
                "9pnet_virtio",
                "9p",
                "sch-ingress",
                "nft_counter",
            ])
            .unwrap();
        let names: Vec<String> = plan
            .files
            .iter()
            .map(|f| name_of(&f.to_string_lossy()))
            .collect();
        assert_eq!(
            names,
            [
                "9pnet",
                "virtio_ring",
                "virtio",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p",
                "sch_ingress"
            ]
        );
        assert_eq!(plan.builtin, ["virtio_pci"]);
        assert_eq!(plan.absent, ["nft_counter"]);
        assert!(index.has("sch_ingress") && index.has("virtio-pci") && !index.has("veth"));
    }
}
