// SPDX-License-Identifier: Apache-2.0
//! The Linux 64-bit boot protocol, checked from inside tiny guests: a guest entered through
//! an ELF (no PVH note) or a hand-made bzImage reads the zero page ember wrote (`rsi`), and
//! prints the command line and the start of the initrd it points to.

mod common;

use std::time::Duration;

use common::*;

/// Prints the NUL-terminated string at the 32-bit guest address stored at [rsi+`field`].
fn print_string_at_zero_page_field(a: &mut Asm, field: u32) {
    a.bytes(&[0x8b, 0x9e]).bytes(&field.to_le_bytes()); // mov ebx, [rsi+field]
    a.mov_dx(0x3f8);
    let top = a.here();
    a.bytes(&[0x8a, 0x03]); // mov al, [rbx]
    a.bytes(&[0x84, 0xc0]); // test al, al
    let jz = a.here();
    a.bytes(&[0x74, 0x00]); // jz out (patched)
    a.out_dx_al();
    a.bytes(&[0x48, 0xff, 0xc3]); // inc rbx
    a.jmp(top);
    let end = a.here();
    a.code[jz + 1] = (end - (jz + 2)) as u8;
}

/// A guest that prints `cmdline=<...>` and `initrd=<...>` from its zero page, then resets.
fn zero_page_reader() -> Vec<u8> {
    let mut a = Asm::new();
    a.print("cmdline=");
    print_string_at_zero_page_field(&mut a, 0x228); // hdr.cmd_line_ptr
    a.print("\ninitrd=");
    print_string_at_zero_page_field(&mut a, 0x218); // hdr.ramdisk_image
    a.print("\n").reset();
    a.code
}

/// A minimal bzImage: boot sector + one setup sector holding the setup header, then the
/// protected-mode "kernel", whose 64-bit entry (load address + 0x200) is `code`.
fn tiny_bzimage(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // boot protocol 2.15
    f[0x211] = 0x01; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&(TINY_LOAD as u32).to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    f[0x236..0x238].copy_from_slice(&0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    f[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    f[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes()); // init_size
    let mut kernel = vec![0x90u8; 0x200];
    kernel.extend_from_slice(code);
    f.extend_from_slice(&kernel);
    f
}

fn check(test: &str, kernel_bytes: Vec<u8>) {
    if !kvm_available(test) {
        return;
    }
    let dir = temp_dir(test);
    let k = dir.join("kernel");
    std::fs::write(&k, kernel_bytes).unwrap();
    let rd = dir.join("initrd");
    std::fs::write(&rd, b"INITRD-CONTENTS\0padding").unwrap();
    let out = run_ember(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            rd.to_str().unwrap(),
            "--mem",
            "64",
            "--no-host-tuning",
            "--no-rng",
            "--cmdline",
            "console=ttyS0 hello=world",
        ],
        None,
        Duration::from_secs(30),
    );
    out.expect_code(0);
    assert!(
        out.stdout.contains("cmdline=console=ttyS0 hello=world\n"),
        "{out:?}"
    );
    assert!(out.stdout.contains("initrd=INITRD-CONTENTS\n"), "{out:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn elf_kernel_gets_zero_page_cmdline_and_initrd() {
    check("proto-elf", tiny_elf(&zero_page_reader(), &[]));
}

#[test]
fn bzimage_kernel_gets_zero_page_cmdline_and_initrd() {
    check("proto-bzimage", tiny_bzimage(&zero_page_reader()));
}

#[test]
fn old_bzimage_is_rejected_with_a_reason() {
    if !kvm_available("old_bzimage") {
        return;
    }
    let dir = temp_dir("proto-oldbz");
    let mut img = tiny_bzimage(&[0xf4]);
    img[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
    let k = dir.join("kernel");
    std::fs::write(&k, img).unwrap();
    let out = run_ember(
        &["run", "--kernel", k.to_str().unwrap()],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("too old for the 64-bit boot protocol"),
        "{out:?}"
    );
}

#[test]
fn large_guest_memory_map_skips_the_mmio_gap() {
    if !kvm_available("large_memory") {
        return;
    }
    // Print the number of e820 entries ([rsi+0x1e8]) as a digit.
    let mut a = Asm::new();
    a.print("e820=");
    a.bytes(&[0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00]); // mov al, [rsi+0x1e8]
    a.bytes(&[0x04, b'0']); // add al, '0'
    a.mov_dx(0x3f8).out_dx_al();
    a.print("\n").reset();
    let dir = temp_dir("proto-bigmem");
    let k = write_tiny_guest(&dir, "k.elf", &a.code, &[]);
    // Guest memory is mapped lazily (MAP_NORESERVE): 4 GiB costs nothing until touched.
    for (mem, entries) in [("3072", '3'), ("4096", '4')] {
        let out = run_ember(
            &["run", "--kernel", k.to_str().unwrap(), "--mem", mem],
            None,
            Duration::from_secs(30),
        );
        out.expect_code(0);
        assert!(out.stdout.contains(&format!("e820={entries}\n")), "{out:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Kernel and initrd of 1 MiB or more go through ember's image cache and are mapped into
/// guest memory, not copied: the guest reads them through KVM, and a guest write into its
/// own kernel image changes neither the user's file nor the cache entry.
#[test]
fn images_mapped_from_the_cache_are_private_to_the_guest() {
    if !kvm_available("image_cache") {
        return;
    }
    let dir = temp_dir("proto-image-cache");
    let target = TINY_LOAD + 0x2000; // inside the padded kernel segment, past the code
    let mut a = Asm::new();
    a.bytes(&[0xbb]).bytes(&(target as u32).to_le_bytes()); // mov ebx, target
    a.bytes(&[0x8a, 0x03]); // mov al, [rbx]: the file's byte ('K')
    a.mov_dx(0x3f8).out_dx_al();
    a.bytes(&[0xc6, 0x03, b'W']); // mov byte [rbx], 'W'
    a.bytes(&[0x8a, 0x03]); // mov al, [rbx]
    a.out_dx_al();
    a.print("\ninitrd=");
    print_string_at_zero_page_field(&mut a, 0x218); // hdr.ramdisk_image
    a.print("\n").reset();
    let mut code = a.code;
    assert!(code.len() < 0x2000);
    code.resize(0x2000, 0x90);
    code.push(b'K');
    code.resize(0x12_0000, 0); // over the cache's 1 MiB minimum
    let kernel = tiny_elf(&code, &[]);
    let k = dir.join("kernel");
    std::fs::write(&k, &kernel).unwrap();
    let mut initrd = b"MAPPED-INITRD\0".to_vec();
    initrd.resize(0x10_0800, 0x5a); // whole pages mapped, the tail copied
    let rd = dir.join("initrd");
    std::fs::write(&rd, &initrd).unwrap();
    let cache = dir.join("cache");
    let boot = || {
        let mut cmd = ember_command(&[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            rd.to_str().unwrap(),
            "--mem",
            "64",
            "--no-host-tuning",
            "--no-rng",
            "--log-level",
            "debug",
        ]);
        cmd.env("EMBER_CACHE_DIR", &cache)
            .env_remove("EMBER_IMAGE_CACHE");
        let out = wait_ember(cmd.spawn().unwrap(), Duration::from_secs(30));
        out.expect_code(0);
        assert!(out.stdout.contains("KW\ninitrd=MAPPED-INITRD\n"), "{out:?}");
        assert!(
            out.stderr.contains("KiB of kernel and initrd mapped"),
            "{out:?}"
        );
    };
    // Twice: the first boot makes the entries, the second maps the same ones.
    for _ in 0..2 {
        boot();
        // Two entries, byte for byte the user's files; the guest's write reached neither.
        let mut entries: Vec<Vec<u8>> = std::fs::read_dir(cache.join("images"))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        entries.sort_by_key(Vec::len);
        assert_eq!(entries, vec![initrd.clone(), kernel.clone()]);
        assert_eq!(std::fs::read(&k).unwrap(), kernel);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn command_line_is_capped_at_ember_s_area_not_the_bzimage_s_claim() {
    if !kvm_available("cmdline_area") {
        return;
    }
    let dir = temp_dir("proto-cmdline-area");
    let mut img = tiny_bzimage(&zero_page_reader());
    img[0x238..0x23c].copy_from_slice(&u32::MAX.to_le_bytes()); // cmdline_size: 4 GiB
    let k = dir.join("kernel");
    std::fs::write(&k, img).unwrap();
    // 960 kB in 8 words (one argument may be at most 128 KiB): from CMDLINE_START it would
    // reach over the kernel loaded at 1 MiB.
    let word = "x".repeat(120_000 - 1);
    let mut args = vec!["run", "--kernel", k.to_str().unwrap(), "--mem", "64"];
    args.extend(["--no-host-tuning", "--no-rng", "--cmdline", "console=ttyS0"]);
    for _ in 0..8 {
        args.extend(["--append", &word]);
    }
    let out = run_ember(&args, None, Duration::from_secs(30));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("this kernel accepts at most 4294967295"),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("ember's command-line area holds at most 65535"),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Another writer truncates ember's cache entry of the kernel while the guest runs (the
/// entry is read-only, but its owner can chmod it, and root can write it anyway): the guest
/// then reads a page of its kernel that the entry no longer has. With `profile`, ember
/// itself reads that page too (the profiler walks the guest's frame pointer, aimed at it),
/// which raised SIGBUS in ember. ember must not die by a signal and must say what happened.
fn truncate_the_cache_entry_under_the_guest(test: &str, profile: bool) {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    if !kvm_available(test) {
        return;
    }
    let dir = temp_dir(test);
    let target = TINY_LOAD + 0x2000; // file offset 0x3000 of the ELF
    let mut a = Asm::new();
    a.print("READY\n");
    let top = a.here();
    a.mov_dx(0x3fd).in_al_dx().bytes(&[0xa8, 0x01]); // test al, 1: a byte came in?
    a.jcc(0x74, top); // jz top
    a.mov_dx(0x3f8).in_al_dx();
    a.bytes(&[0xbd]).bytes(&(target as u32).to_le_bytes()); // mov ebp, target
    a.bytes(&[0xb9]).bytes(&200_000u32.to_le_bytes()); // mov ecx, 200000
    let spin = a.here();
    a.bytes(&[0xff, 0xc9]); // dec ecx: a while for the profiler to sample rbp
    a.jcc(0x75, spin); // jnz spin
    a.bytes(&[0xbb]).bytes(&(target as u32).to_le_bytes()); // mov ebx, target
    a.bytes(&[0x8a, 0x03]); // mov al, [rbx]: 'K', or 0 / 0xff once the page is gone
    a.bytes(&[0x04, b'0']); // add al, '0': printable either way
    a.out_dx_al();
    a.print("\nDONE\n").reset();
    let mut code = a.code;
    assert!(code.len() < 0x1000);
    code.resize(0x2000, 0x90);
    code.push(b'K' - b'0');
    code.resize(0x12_0000, 0); // over the cache's 1 MiB minimum
    let k = dir.join("kernel");
    std::fs::write(&k, tiny_elf(&code, &[])).unwrap();
    let cache = dir.join("cache");
    let profile_out = dir.join("profile.txt");
    let mut args = vec![
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--mem",
        "64",
        "--no-host-tuning",
        "--no-rng",
    ];
    if profile {
        args.extend(["--profile-guest", profile_out.to_str().unwrap()]);
        args.extend(["--profile-rate", "2000"]);
    }
    let mut cmd = ember_command(&args);
    cmd.env("EMBER_CACHE_DIR", &cache)
        .env_remove("EMBER_IMAGE_CACHE")
        .stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"READY\n") {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "no READY: {seen:?}");
        seen.push(byte[0]);
    }
    // Keep the code page (file offsets 0x1000..0x3000), take away the page at 0x3000 on.
    let entries: Vec<_> = std::fs::read_dir(cache.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    std::fs::set_permissions(&entries[0], std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&entries[0])
        .unwrap()
        .set_len(0x3000)
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(b"go").unwrap();
    let out = wait_ember_with_stdout(child, stdout, Duration::from_secs(60));
    assert!(!out.timed_out, "{out:?}");
    assert!(out.code.is_some(), "ember died by a signal: {out:?}");
    assert!(out.stdout.contains("DONE"), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "image cache entry {} was truncated while the VM ran",
            entries[0].display()
        )),
        "{out:?}"
    );
    if profile {
        // ember read the vanished page itself, and mended it.
        assert!(!out.stderr.contains("(0 page(s) read by ember"), "{out:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_cache_entry_truncated_under_a_running_guest_is_reported() {
    truncate_the_cache_entry_under_the_guest("proto-image-truncated", false);
}

#[test]
fn a_cache_entry_truncated_under_ember_s_own_reads_does_not_kill_it() {
    truncate_the_cache_entry_under_the_guest("proto-image-truncated-profiled", true);
}

/// [`wait_ember`] for a child whose stdout the caller took and read from.
fn wait_ember_with_stdout(
    mut child: std::process::Child,
    mut stdout: std::process::ChildStdout,
    timeout: Duration,
) -> Finished {
    use std::io::Read;
    let t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    // wait_ember reads the child's stdout: give it an empty file instead.
    let empty = std::fs::File::open("/dev/null").unwrap();
    child.stdout = Some(std::process::ChildStdout::from(std::os::fd::OwnedFd::from(
        empty,
    )));
    let mut out = wait_ember(child, timeout);
    out.stdout = String::from_utf8_lossy(&t.join().unwrap()).into_owned();
    out
}
