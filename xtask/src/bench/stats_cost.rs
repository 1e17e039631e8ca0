//! What the kernel's BPF run-time statistics charge per run when the program does nothing: the
//! clock reads around each run land partly inside the measured interval. Measured on a
//! two-instruction socket filter run a million times by BPF_PROG_TEST_RUN, with statistics
//! on; subtracted from the mesh's measured datapath time, per run.
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::Context as _;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
const RUNS: u32 = 1_000_000;

fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> std::io::Result<i64> {
    // SAFETY: bpf(2) reads and writes at most `size_of_val(attr)` bytes of the attribute.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// Nanoseconds the statistics report per run of an empty program (statistics must be on).
pub fn per_run_ns() -> anyhow::Result<f64> {
    // r0 = 0; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, ...
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_PROG_TYPE_SOCKET_FILTER) | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("BPF_PROG_LOAD of the calibration program")?;
    // SAFETY: a new program fd we own.
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };

    // BPF_PROG_TEST_RUN: prog_fd, retval, data_size_in, data_size_out, data_in, data_out,
    // repeat, duration. A socket filter needs at least an Ethernet header of input.
    let packet = [0u8; 64];
    let mut attr = [0u64; 10];
    attr[0] = prog.as_raw_fd() as u64;
    attr[1] = packet.len() as u64;
    attr[2] = packet.as_ptr() as u64;
    attr[4] = u64::from(RUNS);
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN of the calibration program")?;

    // struct bpf_prog_info: run_time_ns at byte 192, run_cnt at 200.
    let mut info = [0u64; 32];
    let mut attr = [0u64; 2];
    attr[0] = prog.as_raw_fd() as u64 | (size_of_val(&info) as u64) << 32;
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD of the calibration program")?;
    let (run_time_ns, run_cnt) = (info[192 / 8], info[200 / 8]);
    anyhow::ensure!(run_cnt >= u64::from(RUNS), "the calibration program ran {run_cnt} times: are BPF statistics on?");
    Ok(run_time_ns as f64 / run_cnt as f64)
}
