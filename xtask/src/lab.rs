//! Lab files for `xbr lab up`: the demo reads one (examples/lab.toml), the bench and vmtest
//! write theirs. The spec and its namespace names are xbr's own, `bridge_common::lab`, shared
//! so that xtask cannot drift from the file format `xbr lab up` reads.

use std::path::Path;

use anyhow::Context as _;

pub use bridge_common::lab::*;

/// Writes SPEC to PATH, a comment saying who wrote it first; a spec `xbr lab up` would refuse
/// is refused here already.
pub fn write(spec: &LabSpec, path: &Path, written_by: &str) -> anyhow::Result<()> {
    spec.validate()
        .with_context(|| format!("writing the lab file {}", path.display()))?;
    std::fs::write(path, format!("# {written_by}\n{}", spec.to_toml()))
        .with_context(|| format!("writing the lab file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_lab_reads_back_the_same() {
        let example = crate::cmd::workspace_root().join("examples/lab.toml");
        let lab = LabSpec::from_file(&example).unwrap();
        let dir = std::env::temp_dir().join(format!("xtask-lab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lab.toml");
        write(&lab, &path, "written by a test").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.starts_with("# written by a test\n"), "{text}");
        assert_eq!(LabSpec::parse(&text).unwrap(), lab);
    }
}
