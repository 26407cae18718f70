//! The engine manifest and the host check: a forged GPU, another runtime, a CPU engine on another CPU
//! are each refused with a message naming both sides; the parsers of `nvidia-smi` and `/proc/cpuinfo`
//! read real outputs.

use virnuc_build::manifest::{
    DeviceFacts, DeviceKind, HostFacts, Manifest, check_manifest, parse_cpu_model,
    parse_cuda_version, parse_nvidia_smi_csv,
};

fn h200() -> DeviceFacts {
    DeviceFacts {
        kind: DeviceKind::Gpu,
        name: "NVIDIA H200".into(),
        compute_capability: Some("9.0".into()),
        driver: Some("580.159".into()),
        cuda: Some("13.0".into()),
    }
}

fn host(device: DeviceFacts) -> HostFacts {
    HostFacts {
        device,
        ort_version: "1.31.1".into(),
    }
}

#[test]
fn same_device_and_runtime_pass() {
    let manifest = Manifest::example(h200(), "1.31.1");
    check_manifest(&manifest, &host(h200())).expect("same host");
    // A newer driver does not invalidate a CUDA EP engine (no TensorRT engine cache in it).
    let mut newer = h200();
    newer.driver = Some("590.1".into());
    check_manifest(&manifest, &host(newer)).expect("driver is not compared for CUDA engines");
}

#[test]
fn forged_gpu_name_is_refused_clearly() {
    let mut manifest = Manifest::example(h200(), "1.31.1");
    manifest.device.name = "NVIDIA GeForce RTX 4090 (forged)".into();
    let refusal = check_manifest(&manifest, &host(h200())).expect_err("another GPU");
    let msg = refusal.to_string();
    assert!(msg.contains("NVIDIA GeForce RTX 4090 (forged)"), "{msg}");
    assert!(msg.contains("NVIDIA H200"), "{msg}");
    assert!(msg.contains("another device"), "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    assert!(msg.contains("virnuc-trt build"), "{msg}");
    assert_eq!(refusal.differences.len(), 1, "{msg}");
}

#[test]
fn compute_capability_runtime_and_device_kind_are_compared() {
    let manifest = Manifest::example(h200(), "1.31.1");
    let mut other_cc = h200();
    other_cc.compute_capability = Some("8.0".into());
    let e = check_manifest(&manifest, &host(other_cc)).expect_err("cc");
    assert!(e.to_string().contains("compute capability"), "{e}");

    let mut other_ort = host(h200());
    other_ort.ort_version = "1.30.0".into();
    let e = check_manifest(&manifest, &other_ort).expect_err("runtime");
    assert!(e.to_string().contains("another runtime"), "{e}");
    assert!(e.to_string().contains("1.30.0"), "{e}");

    let cpu = DeviceFacts {
        kind: DeviceKind::Cpu,
        name: "AMD EPYC 9654".into(),
        compute_capability: None,
        driver: None,
        cuda: None,
    };
    let e = check_manifest(&manifest, &host(cpu.clone())).expect_err("cpu host");
    assert!(e.to_string().contains("device kind"), "{e}");

    let cpu_engine = Manifest::example(cpu.clone(), "1.31.1");
    check_manifest(&cpu_engine, &host(cpu.clone())).expect("same CPU");
    let mut other_cpu = cpu;
    other_cpu.name = "Intel Xeon Platinum 8480+".into();
    let e = check_manifest(&cpu_engine, &host(other_cpu)).expect_err("other CPU");
    assert!(e.to_string().contains("CPU is `AMD EPYC 9654`"), "{e}");
}

#[test]
fn tensorrt_engines_also_need_the_same_driver_and_cuda() {
    let mut manifest = Manifest::example(h200(), "1.31.1");
    manifest.ep = "tensorrt".into();
    let mut newer = h200();
    newer.driver = Some("590.1".into());
    newer.cuda = Some("13.1".into());
    let e = check_manifest(&manifest, &host(newer)).expect_err("TensorRT engine cache");
    assert_eq!(e.differences.len(), 2, "{e}");
    assert!(e.to_string().contains("--ep tensorrt"), "{e}");
}

#[test]
fn manifest_round_trips_through_json_and_rejects_other_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = Manifest::example(h200(), "1.31.1");
    manifest.write(dir.path()).expect("write");
    assert_eq!(Manifest::read(dir.path()).expect("read"), manifest);
    let mut other = manifest.clone();
    other.format = "virnuc-trt-engine/99".into();
    other.write(dir.path()).expect("write");
    let e = Manifest::read(dir.path()).expect_err("format");
    assert!(e.to_string().contains("virnuc-trt-engine/99"), "{e}");
    let empty = tempfile::tempdir().expect("tempdir");
    let e = Manifest::read(empty.path()).expect_err("no manifest");
    assert!(e.to_string().contains("virnuc-trt build"), "{e}");
}

#[test]
fn nvidia_smi_and_cpuinfo_outputs_parse() {
    let gpu = parse_nvidia_smi_csv("NVIDIA H100 80GB HBM3, 9.0, 580.159\n").expect("parses");
    assert_eq!(gpu.name, "NVIDIA H100 80GB HBM3");
    assert_eq!(gpu.compute_capability.as_deref(), Some("9.0"));
    assert_eq!(gpu.driver.as_deref(), Some("580.159"));
    assert!(parse_nvidia_smi_csv("").is_err());
    assert!(parse_nvidia_smi_csv("No devices were found").is_err());

    let banner = "| NVIDIA-SMI 580.159   Driver Version: 580.159   CUDA Version: 13.0     |";
    assert_eq!(parse_cuda_version(banner).as_deref(), Some("13.0"));
    assert_eq!(parse_cuda_version("no banner"), None);

    let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
    assert_eq!(parse_cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
    assert_eq!(parse_cpu_model("processor : 0\n"), None);
}
