//! Shared pieces of xbr's kernel-facing tests: unique lab names, cleanup guards, witnesses.

pub mod cgroup_support;
pub mod cni_driver;
pub mod datapath_support;
pub mod docker_support;
pub mod flood;
pub mod frames;
pub mod lab_support;
pub mod overlay_support;
pub mod skip;
pub mod swarm_support;
pub mod traffic;
pub mod witness;
pub mod writers_support;
