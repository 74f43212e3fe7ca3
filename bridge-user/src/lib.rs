//! xbr: a tc/XDP fast path for Linux container bridges.
//!
//! The control plane is observe -> plan -> apply: `observe` reads the kernel into plain
//! values, `plan` turns them into the wanted datapath state without touching anything, and
//! `datapath` applies it (load, attach, fill maps, pin).

pub mod bpf_link;
pub mod cni;
pub mod conntrack;
pub mod datapath;
pub mod docker;
pub mod egress;
pub mod engine;
pub mod error;
pub mod features;
pub mod follow;
pub mod hooks;
pub mod lab;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod observe;
pub mod pins;
pub mod plan;
pub mod policy;
pub mod publish;
pub mod reconcile;
