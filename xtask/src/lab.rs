//! The lab file that `xbr lab up` reads (see examples/lab.toml) and the namespaces it makes of
//! one: xtask's one copy of both, for the demo (which reads a lab file), the bench and vmtest
//! (which write theirs).
//!
//! The product's own is `xbr::lab::LabSpec` (bridge-user/src/lab.rs). xtask cannot depend on
//! bridge-user: building it compiles the eBPF object, which needs the bpf-linker that xtask
//! installs first. So this module mirrors the file format (fields kept as text: `xbr lab up`
//! parses and checks them) and the naming rule `{lab}-host`, `{lab}-{container}`, `{lab}-out`.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lab {
    /// The prefix of every namespace the lab makes.
    pub name: String,
    pub bridge: Bridge,
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<Uplink>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bridge {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    /// ADDRESS/PREFIX.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uplink {
    pub host_address: String,
    pub outside_address: String,
}

impl Lab {
    pub fn read(path: &Path) -> anyhow::Result<Lab> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the lab file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing the lab file {}", path.display()))
    }

    /// The file's text, a comment saying who wrote it first.
    pub fn to_toml(&self, written_by: &str) -> String {
        let body = toml::to_string(self).expect("a lab is plain strings and tables");
        format!("# {written_by}\n{body}")
    }

    /// Writes the lab to PATH (see `to_toml`).
    pub fn write(&self, path: &Path, written_by: &str) -> anyhow::Result<()> {
        std::fs::write(path, self.to_toml(written_by))
            .with_context(|| format!("writing the lab file {}", path.display()))
    }

    pub fn host_netns(&self) -> String {
        host_netns(&self.name)
    }

    pub fn container_netns(&self, container: &str) -> String {
        container_netns(&self.name, container)
    }

    pub fn outside_netns(&self) -> Option<String> {
        self.uplink.as_ref().map(|_| outside_netns(&self.name))
    }

    /// Every namespace `xbr lab up` makes: host, containers in order, then outside.
    pub fn namespaces(&self) -> Vec<String> {
        let containers = self
            .containers
            .iter()
            .map(|container| self.container_netns(&container.name));
        std::iter::once(self.host_netns())
            .chain(containers)
            .chain(self.outside_netns())
            .collect()
    }
}

impl Container {
    /// The address without its prefix length.
    pub fn ip(&self) -> &str {
        self.address.split('/').next().unwrap_or_default()
    }
}

/// The namespace holding lab LAB's bridge.
pub fn host_netns(lab: &str) -> String {
    format!("{lab}-host")
}

/// The namespace of CONTAINER in lab LAB.
pub fn container_netns(lab: &str, container: &str) -> String {
    format!("{lab}-{container}")
}

/// The namespace behind lab LAB's uplink.
pub fn outside_netns(lab: &str) -> String {
    format!("{lab}-out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_lab_reads_and_names_its_namespaces() {
        let lab = Lab::read(&crate::cmd::workspace_root().join("examples/lab.toml")).unwrap();
        let namespaces = lab.namespaces();
        assert_eq!(namespaces[0], lab.host_netns());
        assert_eq!(
            namespaces.len(),
            1 + lab.containers.len() + usize::from(lab.uplink.is_some())
        );
        assert!(!lab.containers[0].ip().contains('/'));
    }

    #[test]
    fn a_written_lab_reads_back_the_same() {
        let lab = Lab {
            name: "t".into(),
            bridge: Bridge {
                name: "br0".into(),
                address: Some("10.77.0.1/24".into()),
            },
            containers: vec![Container {
                name: "a".into(),
                address: "10.77.0.2/24".into(),
                mac: None,
            }],
            uplink: Some(Uplink {
                host_address: "10.78.0.1/24".into(),
                outside_address: "10.78.0.2/24".into(),
            }),
        };
        let text = lab.to_toml("written by a test");
        assert!(text.starts_with("# written by a test\n"), "{text}");
        assert!(text.contains("[[containers]]"), "{text}");
        assert_eq!(toml::from_str::<Lab>(&text).unwrap(), lab);
        assert_eq!(lab.namespaces(), ["t-host", "t-a", "t-out"]);
    }
}
