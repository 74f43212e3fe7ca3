//! The CNI protocol over recorded inputs: what podman 4.3 (CNI backend, containernetworking-
//! plugins 1.1.1) handed a chained plugin, for a 0.4.0 and a 1.0.0 conflist.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::protocol::*;
use super::wanted_ports;
use crate::publish::{Proto, PublishSpec};

/// podman's ADD environment.
fn vars(command: &str) -> BTreeMap<String, String> {
    [
        ("CNI_COMMAND", command),
        (
            "CNI_CONTAINERID",
            "3f2b7c9d1e0a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e",
        ),
        (
            "CNI_NETNS",
            "/run/netns/netns-bc287dce-22ce-7dc2-bf28-1c64a7cf3a20",
        ),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=xbr1"),
        ("CNI_PATH", "/usr/lib/cni:/opt/cni/bin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The prevResult xbr-cni gets after bridge, portmap and firewall (a 0.4.0 conflist).
fn prev_result_040() -> Value {
    json!({"cniVersion":"0.4.0",
        "interfaces":[{"name":"barcni0","mac":"02:7b:2d:0a:c2:12"},
                      {"name":"vethf0665c41","mac":"66:9c:15:a2:13:45"},
                      {"name":"eth0","mac":"9a:9e:1c:5c:24:1e",
                       "sandbox":"/run/netns/netns-bc287dce-22ce-7dc2-bf28-1c64a7cf3a20"}],
        "ips":[{"version":"4","interface":2,"address":"10.252.0.9/24","gateway":"10.252.0.1"}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{}})
}

fn conf_040() -> Value {
    json!({"cniVersion":"0.4.0","name":"xbrnet","type":"xbr-cni",
           "socketHooks": false, "prevResult": prev_result_040()})
}

/// A 1.0.0 conflist: no `ips[].version`, the capability's port mappings in runtimeConfig.
fn conf_100() -> Value {
    json!({"cniVersion":"1.0.0","name":"xbrnet","type":"xbr-cni",
        "capabilities":{"portMappings":true},
        "uplinks":["eth9"],
        "runtimeConfig":{"portMappings":[
            {"hostPort":18081,"containerPort":8000,"protocol":"tcp"},
            {"hostPort":5353,"containerPort":53,"protocol":"udp","hostIP":"192.0.2.10"},
            {"hostPort":8443,"containerPort":443,"protocol":"tcp","hostIP":"2001:db8::1"},
            {"hostPort":9000,"containerPort":9000,"protocol":"sctp"}]},
        "prevResult":{"cniVersion":"1.0.0",
            "interfaces":[{"name":"cni0","mac":"02:7b:2d:0a:c2:12"},
                          {"name":"veth0a1b2c3d","mac":"66:9c:15:a2:13:45"},
                          {"name":"eth0","mac":"9a:9e:1c:5c:24:1e","sandbox":"/var/run/netns/cni-1"}],
            "ips":[{"interface":2,"address":"10.42.0.7/24","gateway":"10.42.0.1"},
                   {"interface":2,"address":"fd00::7/64"}]}})
}

fn bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

#[test]
fn the_environment_of_an_add_is_read() {
    let env = Environment::from_vars(&vars("ADD")).unwrap();
    assert_eq!(env.command, Command::Add);
    assert_eq!(env.ifname, "eth0");
    assert_eq!(
        env.netns.unwrap().to_str(),
        Some("/run/netns/netns-bc287dce-22ce-7dc2-bf28-1c64a7cf3a20")
    );
}

#[test]
fn version_and_del_need_less_of_the_environment() {
    // libcni's VERSION probe: CNI_NETNS=dummy, no container.
    let mut version = BTreeMap::new();
    version.insert("CNI_COMMAND".to_owned(), "VERSION".to_owned());
    assert_eq!(
        Environment::from_vars(&version).unwrap().command,
        Command::Version
    );
    // DEL of a container whose namespace is gone.
    let mut del = vars("DEL");
    del.remove("CNI_NETNS");
    assert_eq!(Environment::from_vars(&del).unwrap().netns, None);
    // ADD cannot do without it.
    let mut add = vars("ADD");
    add.remove("CNI_NETNS");
    let error = Environment::from_vars(&add).unwrap_err();
    assert_eq!(error.code, Code::InvalidEnvironment);
    assert!(error.msg.contains("CNI_NETNS"), "{error:?}");
}

#[test]
fn an_unknown_command_is_an_environment_error() {
    let error = Environment::from_vars(&vars("REBOOT")).unwrap_err();
    assert_eq!(error.code, Code::InvalidEnvironment);
    assert!(error.msg.contains("REBOOT"));
}

#[test]
fn version_answers_in_the_version_asked() {
    let answer: Value =
        serde_json::from_str(&version_result(br#"{"cniVersion":"1.0.0"}"#)).unwrap();
    assert_eq!(answer["cniVersion"], "1.0.0");
    assert_eq!(
        answer["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let unknown: Value = serde_json::from_str(&version_result(b"")).unwrap();
    assert_eq!(unknown["cniVersion"], "1.1.0");
}

#[test]
fn add_prints_prev_result_unchanged_in_the_configurations_version() {
    let conf = NetConf::parse(&bytes(&conf_040()), Command::Add).unwrap();
    let printed: Value = serde_json::from_str(&add_result(&conf)).unwrap();
    assert_eq!(printed, prev_result_040());
}

#[test]
fn the_endpoint_is_read_from_a_0_4_0_prev_result() {
    let conf = NetConf::parse(&bytes(&conf_040()), Command::Add).unwrap();
    let endpoint = conf.required_endpoint("eth0").unwrap();
    assert_eq!(endpoint.host_interfaces, ["barcni0", "vethf0665c41"]);
    assert_eq!(
        endpoint.container_mac,
        Some([0x9a, 0x9e, 0x1c, 0x5c, 0x24, 0x1e])
    );
    assert_eq!(
        endpoint.container_ipv4,
        ["10.252.0.9".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(conf.socket_hooks, Some(SocketHooks::Enabled(false)));
}

#[test]
fn the_endpoint_and_port_mappings_are_read_from_a_1_0_0_configuration() {
    let conf = NetConf::parse(&bytes(&conf_100()), Command::Add).unwrap();
    let endpoint = conf.required_endpoint("eth0").unwrap();
    assert_eq!(endpoint.host_interfaces, ["cni0", "veth0a1b2c3d"]);
    // The IPv6 address is not one xbr publishes to.
    assert_eq!(
        endpoint.container_ipv4,
        ["10.42.0.7".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(conf.uplinks, ["eth9"]);
    let container_ip = endpoint.container_ipv4[0];
    // IPv6 host addresses and SCTP stay with portmap.
    assert_eq!(
        wanted_ports(&conf.runtime_config.port_mappings, container_ip),
        [
            PublishSpec {
                host_ip: None,
                host_port: 18081,
                container_ip,
                container_port: 8000,
                proto: Proto::Tcp
            },
            PublishSpec {
                host_ip: Some("192.0.2.10".parse().unwrap()),
                host_port: 5353,
                container_ip,
                container_port: 53,
                proto: Proto::Udp
            },
        ]
    );
}

#[test]
fn add_without_prev_result_says_where_xbr_cni_goes() {
    let mut conf = conf_040();
    conf.as_object_mut().unwrap().remove("prevResult");
    let conf = NetConf::parse(&bytes(&conf), Command::Add).unwrap();
    let error = conf.required_endpoint("eth0").unwrap_err();
    assert_eq!(error.code, Code::InvalidConfig);
    assert!(
        error.details.contains("after the `bridge` plugin"),
        "{error:?}"
    );
}

#[test]
fn a_prev_result_without_host_interfaces_is_refused() {
    let mut conf = conf_040();
    conf["prevResult"]["interfaces"] = json!([{"name":"eth0","sandbox":"/run/netns/x"}]);
    let conf = NetConf::parse(&bytes(&conf), Command::Add).unwrap();
    assert_eq!(
        conf.required_endpoint("eth0").unwrap_err().code,
        Code::InvalidConfig
    );
}

#[test]
fn unsupported_versions_are_refused_with_code_1() {
    let mut conf = conf_040();
    conf["cniVersion"] = json!("0.2.0");
    let error = NetConf::parse(&bytes(&conf), Command::Add).unwrap_err();
    assert_eq!(error.code, Code::IncompatibleVersion);
    // CHECK came with 0.4.0, GC and STATUS with 1.1.0.
    let mut conf = conf_040();
    conf["cniVersion"] = json!("0.3.1");
    assert_eq!(
        NetConf::parse(&bytes(&conf), Command::Check)
            .unwrap_err()
            .code,
        Code::IncompatibleVersion
    );
    assert_eq!(
        NetConf::parse(&bytes(&conf_100()), Command::Gc)
            .unwrap_err()
            .code,
        Code::IncompatibleVersion
    );
}

#[test]
fn malformed_configuration_is_a_decode_error() {
    let error = NetConf::parse(b"{\"cniVersion\": 1", Command::Add).unwrap_err();
    assert_eq!(error.code, Code::Decode);
    let mut conf = conf_040();
    conf["mode"] = json!("fast");
    let error = NetConf::parse(&bytes(&conf), Command::Add).unwrap_err();
    assert_eq!(error.code, Code::InvalidConfig);
}

#[test]
fn errors_are_the_specs_error_object() {
    let error = CniError::new(Code::TryAgainLater, "busy", "bridge cni0 is being changed");
    let printed: Value = serde_json::from_str(&error.to_json("1.0.0")).unwrap();
    assert_eq!(
        printed,
        json!({"cniVersion":"1.0.0","code":11,"msg":"busy","details":"bridge cni0 is being changed"})
    );
    assert_eq!(reply_version(&bytes(&conf_040())), "0.4.0");
    assert_eq!(reply_version(b"not json"), "1.1.0");
}

#[test]
fn socket_hooks_take_a_cgroup_path() {
    let mut conf = conf_040();
    conf["socketHooks"] = json!("/sys/fs/cgroup/unified/pods");
    let conf = NetConf::parse(&bytes(&conf), Command::Add).unwrap();
    assert_eq!(
        conf.socket_hooks,
        Some(SocketHooks::Cgroup("/sys/fs/cgroup/unified/pods".into()))
    );
}
