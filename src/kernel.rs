// SPDX-License-Identifier: Apache-2.0
//! Loading the guest kernel (ELF vmlinux, with or without a PVH entry, or bzImage) and the
//! initrd into guest memory, and writing the command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use crate::arch::x86_64::regs::EntryProtocol;
use crate::arch::x86_64::InitrdPlacement;
use crate::image_file::{ImageCache, ImageFile};
use crate::memory::GuestMemory;

/// The x86 kernel's command-line limit when the image does not say (COMMAND_LINE_SIZE).
pub const DEFAULT_CMDLINE_LIMIT: usize = 2048;

/// Errors while loading the kernel, initrd and command line.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel image {path}: {source} (check --kernel)")]
    Open {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither ELF nor bzImage.
    #[error(
        "{0} is neither an ELF vmlinux nor a bzImage: pass the kernel's vmlinux (ELF) or \
         arch/x86/boot/bzImage"
    )]
    UnknownFormat(PathBuf),
    /// Reading the file failed.
    #[error("cannot read kernel image {path}: {source}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The loader rejected the image.
    #[error(
        "cannot load kernel image {path} ({source}): it may be corrupt, built for another \
         architecture, or larger than guest memory (try a larger --mem)"
    )]
    Load {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// An ELF image whose program headers, or a bzImage whose setup header, cannot be a
    /// kernel's (checked before loading).
    #[error("kernel image {path} cannot be loaded: {why}")]
    BadImage {
        /// The path given.
        path: PathBuf,
        /// What is wrong, and the fix.
        why: String,
    },
    /// A bzImage too old for the 64-bit boot protocol.
    #[error("bzImage {0} is too old for the 64-bit boot protocol (needs boot protocol 2.12+)")]
    OldBzImage(PathBuf),
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}: {source} (check --initrd)")]
    Initrd {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error(
        "the initrd ({size_kib} KiB) does not fit in guest memory between the end of the \
         kernel ({kernel_end:#x}) and {limit:#x}: give the guest more memory with --mem"
    )]
    InitrdTooLarge {
        /// Initrd size in KiB.
        size_kib: u64,
        /// End of the kernel image in guest memory.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
    /// The command line is longer than the kernel accepts, or than ember's command-line
    /// area holds.
    #[error(
        "the kernel command line is {len} bytes, but this kernel accepts at most {kernel} \
         and ember's command-line area holds at most {area}: shorten --cmdline"
    )]
    CmdlineTooLong {
        /// Length of the command line.
        len: usize,
        /// The kernel's limit (excluding the terminating NUL).
        kernel: usize,
        /// The room at [`CMDLINE_START`] (excluding the terminating NUL).
        area: usize,
    },
    /// The command line is malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing to guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str),
}

/// The kind of kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux.
    Elf,
    /// bzImage (Linux boot protocol).
    BzImage,
}

/// What loading the kernel produced.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The image's format.
    pub format: KernelFormat,
    /// How to enter it.
    pub protocol: EntryProtocol,
    /// Entry point (guest-physical).
    pub entry: u64,
    /// First byte after the kernel in guest memory (including what it will decompress into).
    pub kernel_end: u64,
    /// The kernel's setup header (bzImage only).
    pub header: Option<setup_header>,
    /// Longest command line the kernel accepts, without the NUL.
    pub cmdline_limit: usize,
    /// Highest address (inclusive) the initrd may end at.
    pub initrd_addr_max: u64,
}

/// Looks at the first bytes of the image to tell its format.
pub fn detect_format(path: &Path) -> Result<KernelFormat, KernelError> {
    let mut f = crate::user_file::open_regular(path).map_err(|source| KernelError::Open {
        path: path.into(),
        source,
    })?;
    let mut head = [0u8; 0x206];
    let n = read_up_to(&mut f, &mut head).map_err(|source| KernelError::Read {
        path: path.into(),
        source,
    })?;
    if n >= 4 && head[0..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(KernelError::UnknownFormat(path.into()))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads the kernel image at `path` into `mem`; with a `cache`, its page-aligned parts are
/// mapped from ember's copy of the file instead of copied (see [`crate::image_file`]).
/// Returns the kernel and the bytes mapped.
pub fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
    cache: Option<&ImageCache>,
) -> Result<(LoadedKernel, usize), KernelError> {
    let format = detect_format(path)?;
    let mut file = ImageFile::open(path, mem, cache).map_err(|source| KernelError::Open {
        path: path.into(),
        source,
    })?;
    let load_err = |source| KernelError::Load {
        path: path.into(),
        source,
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    let loaded = match format {
        KernelFormat::Elf => {
            check_elf_segments(path, mem)?;
            let r = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let (protocol, entry) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (EntryProtocol::Pvh, addr.0),
                _ => (EntryProtocol::Linux64, r.kernel_load.0),
            };
            Ok(LoadedKernel {
                format,
                protocol,
                entry,
                kernel_end: r.kernel_end,
                header: None,
                cmdline_limit: DEFAULT_CMDLINE_LIMIT - 1,
                initrd_addr_max: MMIO_GAP_START - 1,
            })
        }
        KernelFormat::BzImage => {
            file.seek(SeekFrom::Start(0))
                .map_err(|source| KernelError::Read {
                    path: path.into(),
                    source,
                })?;
            check_bzimage_header(path, mem)?;
            let r = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| KernelError::UnknownFormat(path.into()))?;
            let version = hdr.version;
            // 2.12 brought xloadflags and the 64-bit entry at load address + 0x200.
            if version < 0x020c || hdr.xloadflags & 1 == 0 {
                return Err(KernelError::OldBzImage(path.into()));
            }
            let load = r.kernel_load.0;
            // The kernel decompresses in place and needs init_size bytes from its load address.
            let kernel_end = r.kernel_end.max(load + u64::from(hdr.init_size));
            let cmdline_limit = if hdr.cmdline_size > 0 {
                usize::try_from(hdr.cmdline_size).unwrap_or(DEFAULT_CMDLINE_LIMIT)
            } else {
                255
            };
            // XLF_CAN_BE_LOADED_ABOVE_4G (bit 1) lifts the initrd limit; ember keeps it below
            // the MMIO gap anyway.
            let initrd_addr_max = if hdr.initrd_addr_max > 0 {
                u64::from(hdr.initrd_addr_max)
            } else {
                0x37ff_ffff
            };
            Ok(LoadedKernel {
                format,
                protocol: EntryProtocol::Linux64,
                entry: load + 0x200,
                kernel_end,
                header: Some(hdr),
                cmdline_limit,
                initrd_addr_max: initrd_addr_max.min(MMIO_GAP_START - 1),
            })
        }
    };
    Ok((loaded?, file.stats().0))
}

/// An image opened for the header checks below: its path (for messages), the file and its
/// length.
struct ImageCheck<'a> {
    path: &'a Path,
    file: File,
    len: u64,
}

impl<'a> ImageCheck<'a> {
    fn open(path: &'a Path) -> Result<Self, KernelError> {
        let file = File::open(path).map_err(|e| Self::read_error(path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Self::read_error(path, e))?
            .len();
        Ok(Self { path, file, len })
    }

    fn read_error(path: &Path, source: std::io::Error) -> KernelError {
        KernelError::Read {
            path: path.into(),
            source,
        }
    }

    /// The error for an image that cannot be a kernel, and `why`.
    fn bad(&self, why: String) -> KernelError {
        KernelError::BadImage {
            path: self.path.into(),
            why,
        }
    }

    /// Fills `buf` from byte `offset` of the file.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), KernelError> {
        use std::os::unix::fs::FileExt;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Self::read_error(self.path, e))
    }
}

/// Checks the setup header of the bzImage at `path` against the file and guest memory before
/// linux-loader sees it: the boot protocol version (2.12+ for the 64-bit entry), the setup
/// code and the protected-mode kernel within the file, and the memory the kernel needs to
/// decompress itself (`init_size` from where it is loaded) within guest RAM.
pub fn check_bzimage_header(path: &Path, mem: &GuestMemory) -> Result<(), KernelError> {
    use vm_memory::GuestMemoryBackend;
    let img = ImageCheck::open(path)?;
    let len = img.len;
    let mut h = [0u8; 0x268];
    if len < h.len() as u64 {
        return Err(img.bad(format!(
            "the file is {len} bytes, shorter than a bzImage's setup header: it is truncated"
        )));
    }
    img.read_exact_at(&mut h, 0)?;
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let version = u16::from_le_bytes([h[0x206], h[0x207]]);
    if version < 0x020c {
        return Err(KernelError::OldBzImage(path.into()));
    }
    let sects = match h[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let setup = (sects + 1) * 512;
    if setup >= len {
        return Err(img.bad(format!(
            "its setup header says the setup code is {setup} bytes ({sects} sectors), but the \
             file is {len} bytes: it is truncated or damaged"
        )));
    }
    let kernel = u64::from(u32_at(0x1f4)) * 16;
    // syssize is rounded up to 16-byte paragraphs: a few bytes of slack.
    if kernel > len - setup + 16 {
        return Err(img.bad(format!(
            "its setup header says the kernel is {kernel} bytes, but the file has {} after \
             the setup code: it is truncated or damaged",
            len - setup
        )));
    }
    let ram_end = mem.last_addr().0.saturating_add(1);
    let need = HIMEM_START.saturating_add(u64::from(u32_at(0x260)));
    if need > ram_end {
        return Err(img.bad(format!(
            "it needs {} bytes (init_size) from {HIMEM_START:#x} to decompress itself, beyond \
             the guest's RAM ({ram_end:#x}): give the guest more memory with --mem, or the image \
             is damaged",
            u32_at(0x260)
        )));
    }
    Ok(())
}

/// Most program headers a kernel ELF is expected to have (vmlinux has about five).
const MAX_ELF_PHDRS: u64 = 64;

/// Checks the program headers of the ELF kernel at `path` against the file and guest memory
/// before linux-loader sees it, so that a damaged or hostile image gets a message that says
/// which segment is wrong and why: headers past the end of the file, too many of them, a
/// loadable segment past the end of the file, larger in the file than in memory, outside
/// guest RAM or below 1 MiB, or two loadable segments that overlap.
pub fn check_elf_segments(path: &Path, mem: &GuestMemory) -> Result<(), KernelError> {
    use vm_memory::GuestMemoryBackend;
    let img = ImageCheck::open(path)?;
    let len = img.len;
    let mut eh = [0u8; 64];
    if len < 64 {
        return Err(img.bad(format!(
            "the file is {len} bytes, shorter than an ELF header: it is truncated"
        )));
    }
    img.read_exact_at(&mut eh, 0)?;
    let u16_at = |b: &[u8], at: usize| u64::from(u16::from_le_bytes([b[at], b[at + 1]]));
    let u64_at = |b: &[u8], at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    };
    if eh[4] != 2 || eh[5] != 1 || u16_at(&eh, 18) != 62 {
        return Err(img.bad(
            "it is not a 64-bit little-endian x86-64 ELF (build the kernel for x86_64)".into(),
        ));
    }
    let (phoff, phentsize, phnum) = (u64_at(&eh, 32), u16_at(&eh, 54), u16_at(&eh, 56));
    if phnum == 0 || phnum > MAX_ELF_PHDRS {
        return Err(img.bad(format!(
            "it has {phnum} program headers (a kernel has 1 to {MAX_ELF_PHDRS})"
        )));
    }
    if phentsize != 56 {
        return Err(img.bad(format!(
            "its program headers are {phentsize} bytes each, not 56"
        )));
    }
    let table_end = phoff.checked_add(phnum * 56);
    if table_end.is_none_or(|end| end > len) {
        return Err(img.bad(format!(
            "its {phnum} program headers at offset {phoff:#x} lie past the end of the file \
                 ({len} bytes): it is truncated or damaged"
        )));
    }
    let mut table = vec![0u8; usize::try_from(phnum * 56).unwrap_or(0)];
    img.read_exact_at(&mut table, phoff)?;
    let ram_end = mem.last_addr().0.saturating_add(1);
    let mut loads: Vec<(u64, u64, usize)> = Vec::new();
    for (i, ph) in table.chunks_exact(56).enumerate() {
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr) = (u64_at(ph, 8), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        if filesz > memsz {
            return Err(img.bad(format!(
                "loadable segment {i} has {filesz} bytes in the file but only {memsz} in \
                 memory: it is damaged"
            )));
        }
        if offset.checked_add(filesz).is_none_or(|end| end > len) {
            return Err(img.bad(format!(
                "loadable segment {i} (file offset {offset:#x}, {filesz} bytes) lies past the \
                 end of the file ({len} bytes): it is truncated"
            )));
        }
        let end = paddr.checked_add(memsz);
        if paddr < HIMEM_START || end.is_none_or(|e| e > ram_end) {
            return Err(img.bad(format!(
                "loadable segment {i} (guest addresses {paddr:#x}, {memsz} bytes) is not within \
                 guest RAM above 1 MiB (RAM ends at {ram_end:#x}): give the guest more memory \
                 with --mem, or the image is damaged"
            )));
        }
        if memsz > 0 {
            loads.push((paddr, paddr + memsz, i));
        }
    }
    if loads.is_empty() {
        return Err(img.bad("it has no loadable segment".into()));
    }
    loads.sort_unstable();
    for w in loads.windows(2) {
        let ((a_start, a_end, a), (b_start, b_end, b)) = (w[0], w[1]);
        if b_start < a_end {
            return Err(img.bad(format!(
                "loadable segments {a} ({a_start:#x}..{a_end:#x}) and {b} ({b_start:#x}..\
                 {b_end:#x}) overlap in guest memory: it is damaged"
            )));
        }
    }
    Ok(())
}

/// Where an initrd of `size` bytes goes: as high as the kernel allows (page aligned), above
/// the kernel.
fn initrd_address(mem_size: u64, kernel: &LoadedKernel, size: u64) -> Result<u64, KernelError> {
    let low_ram_end = mem_size.min(MMIO_GAP_START);
    let limit = (kernel.initrd_addr_max + 1).min(low_ram_end);
    let too_large = || KernelError::InitrdTooLarge {
        size_kib: size.div_ceil(1024),
        kernel_end: kernel.kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel.kernel_end {
        return Err(too_large());
    }
    Ok(addr)
}

/// Places the initrd bytes as high as the kernel allows (page aligned), above the kernel.
pub fn load_initrd(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &LoadedKernel,
    initrd: &[u8],
) -> Result<InitrdPlacement, KernelError> {
    let size = initrd.len() as u64;
    let addr = initrd_address(mem_size, kernel, size)?;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(|_| KernelError::Write("initrd"))?;
    Ok(InitrdPlacement { addr, size })
}

/// Places the initrd file at `path`, then `extra` bytes (another cpio archive: Linux unpacks
/// concatenated archives, the first ending 4-aligned), as high as the kernel allows. The
/// file is read straight into guest memory, or with a `cache` mostly mapped from ember's copy
/// of it (see [`crate::image_file`]). Returns the placement and the bytes mapped.
pub fn load_initrd_file(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
    extra: Option<&[u8]>,
    cache: Option<&ImageCache>,
) -> Result<(InitrdPlacement, usize), KernelError> {
    let err = |source| KernelError::Initrd {
        path: path.into(),
        source,
    };
    let mut file = ImageFile::open(path, mem, cache).map_err(err)?;
    let file_len = file.len();
    let size = match extra {
        Some(e) => file_len.next_multiple_of(4) + e.len() as u64,
        None => file_len,
    };
    let addr = initrd_address(mem_size, kernel, size)?;
    let count = usize::try_from(file_len).map_err(|_| KernelError::Write("initrd"))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, count)
        .map_err(|e| {
            err(std::io::Error::other(format!(
                "reading {count} bytes into guest memory failed ({e}); was the file changed \
                 while ember read it?"
            )))
        })?;
    if let Some(e) = extra {
        let pad = file_len.next_multiple_of(4) - file_len;
        mem.write_slice(&[0u8; 3][..pad as usize], GuestAddress(addr + file_len))
            .and_then(|()| mem.write_slice(e, GuestAddress(addr + file_len + pad)))
            .map_err(|_| KernelError::Write("initrd"))?;
    }
    Ok((InitrdPlacement { addr, size }, file.stats().0))
}

/// What the image loader produces: the kernel, and the initrd when there is one.
pub type LoadedImages = (LoadedKernel, Option<InitrdPlacement>);

/// Loads the kernel, then the initrd file and `extra` initrd bytes, into guest memory.
pub fn load_images(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    extra: Option<&[u8]>,
    cache: Option<&ImageCache>,
) -> Result<LoadedImages, KernelError> {
    let (loaded, mut mapped) = load_kernel(mem, kernel, cache)?;
    let placed = match (initrd, extra) {
        (Some(path), extra) => {
            let (placed, n) = load_initrd_file(mem, mem_size, &loaded, path, extra, cache)?;
            mapped += n;
            Some(placed)
        }
        (None, Some(extra)) => Some(load_initrd(mem, mem_size, &loaded, extra)?),
        (None, None) => None,
    };
    if mapped > 0 {
        log::debug!(
            "{} KiB of kernel and initrd mapped (copy-on-write) from the image cache",
            mapped >> 10
        );
    }
    Ok((loaded, placed))
}

/// [`load_images`] on a helper thread, so that the copying (milliseconds of CPU for a
/// 10 MB kernel) overlaps with the VM set-up that waits on KVM.
#[derive(Debug)]
pub struct ImageLoader(LoaderState);

#[derive(Debug)]
enum LoaderState {
    Running(std::thread::JoinHandle<Result<LoadedImages, KernelError>>),
    Done(Result<LoadedImages, KernelError>),
}

impl ImageLoader {
    /// Starts loading (on the calling thread if no thread can be started).
    pub fn spawn(
        mem: &GuestMemory,
        mem_size: u64,
        kernel: &Path,
        initrd: Option<&Path>,
        extra: Option<&[u8]>,
        cache: Option<&ImageCache>,
    ) -> Self {
        let job = {
            let (mem, kernel) = (mem.clone(), kernel.to_path_buf());
            let (initrd, extra) = (initrd.map(Path::to_path_buf), extra.map(<[u8]>::to_vec));
            let cache = cache.cloned();
            move || {
                let (initrd, extra) = (initrd.as_deref(), extra.as_deref());
                load_images(&mem, mem_size, &kernel, initrd, extra, cache.as_ref())
            }
        };
        match std::thread::Builder::new()
            .name("ember-loader".into())
            .spawn(job)
        {
            Ok(h) => Self(LoaderState::Running(h)),
            Err(e) => {
                log::debug!("cannot start the loader thread ({e}); loading in place");
                Self(LoaderState::Done(load_images(
                    mem, mem_size, kernel, initrd, extra, cache,
                )))
            }
        }
    }

    /// Waits for the images.
    pub fn join(self) -> Result<LoadedImages, KernelError> {
        match self.0 {
            LoaderState::Running(h) => h.join().unwrap_or(Err(KernelError::Write(
                "kernel (the loader thread panicked)",
            ))),
            LoaderState::Done(r) => r,
        }
    }
}

/// Reads an initrd file.
pub fn read_initrd(path: &Path) -> Result<Vec<u8>, KernelError> {
    crate::user_file::read_regular(path).map_err(|source| KernelError::Initrd {
        path: path.into(),
        source,
    })
}

/// Checks the command line against the kernel's limit and writes it at [`CMDLINE_START`].
/// Returns its length.
pub fn write_cmdline(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<usize, KernelError> {
    check_cmdline(cmdline, kernel.cmdline_limit)?;
    let mut c = Cmdline::new(cmdline.len() + 1).map_err(|e| KernelError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| KernelError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c)
        .map_err(|_| KernelError::Write("command line"))?;
    Ok(cmdline.len())
}

/// Longest command line ember's command-line area holds, without the terminating NUL:
/// anything longer would run over what lies above it (a bzImage's `cmdline_size` can claim
/// up to 4 GiB).
pub const CMDLINE_AREA_LIMIT: usize = CMDLINE_MAX_SIZE - 1;

/// Checks a command line's length, against both the kernel's `limit` and ember's
/// command-line area, and its characters.
pub fn check_cmdline(cmdline: &str, limit: usize) -> Result<(), KernelError> {
    if cmdline.len() > limit.min(CMDLINE_AREA_LIMIT) {
        return Err(KernelError::CmdlineTooLong {
            len: cmdline.len(),
            kernel: limit,
            area: CMDLINE_AREA_LIMIT,
        });
    }
    if let Some(c) = cmdline
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_control())
    {
        return Err(KernelError::Cmdline(format!(
            "it contains the character {c:?}; only printable ASCII is allowed"
        )));
    }
    Ok(())
}

/// Reads back the command line from guest memory (for tests).
pub fn read_cmdline(mem: &GuestMemory, len: usize) -> Option<String> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(CMDLINE_START)).ok()?;
    String::from_utf8(buf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("ember-kernel-test-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn fake_kernel(end: u64) -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            protocol: EntryProtocol::Pvh,
            entry: 0x100_0000,
            kernel_end: end,
            header: None,
            cmdline_limit: 2047,
            initrd_addr_max: MMIO_GAP_START - 1,
        }
    }

    #[test]
    fn detects_formats() {
        let elf = tmpfile("elf", b"\x7fELF\x02\x01\x01");
        assert_eq!(detect_format(&elf).unwrap(), KernelFormat::Elf);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = tmpfile("bz", &bz);
        assert_eq!(detect_format(&bz).unwrap(), KernelFormat::BzImage);
        let junk = tmpfile("junk", b"hello world");
        let e = detect_format(&junk).unwrap_err();
        assert!(e
            .to_string()
            .contains("neither an ELF vmlinux nor a bzImage"));
        let missing = detect_format(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(missing.to_string().contains("--kernel"));
        for p in [elf, bz, junk] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn initrd_goes_high_and_above_the_kernel() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let k = fake_kernel(0x200_0000);
        let data = vec![0xabu8; 10_000];
        let p = load_initrd(&mem, 64 << 20, &k, &data).unwrap();
        assert_eq!(p.addr % 4096, 0);
        assert!(p.addr + p.size <= 64 << 20);
        assert!(p.addr >= 0x200_0000);
        let b: u8 = mem.read_obj(GuestAddress(p.addr + 9999)).unwrap();
        assert_eq!(b, 0xab);
    }

    #[test]
    fn initrd_that_does_not_fit_is_an_error() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let k = fake_kernel(0x80_0000);
        let data = vec![0u8; 12 << 20];
        let e = load_initrd(&mem, 16 << 20, &k, &data).unwrap_err();
        assert!(e.to_string().contains("--mem"), "{e}");
        let data = vec![0u8; 32 << 20];
        assert!(load_initrd(&mem, 16 << 20, &k, &data).is_err());
    }

    #[test]
    fn initrd_file_goes_straight_into_guest_memory_with_extra_archive() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let _registered = crate::image_file::MappedImages::new(&mem);
        let k = fake_kernel(0x200_0000);
        let path = tmpfile("initrd", &[0x11u8; 4097]);
        let dir = std::env::temp_dir().join(format!("ember-initrd-cache-{}", std::process::id()));
        let cache = ImageCache::new(&dir).with_min_size(0);
        let (p, mapped) =
            load_initrd_file(&mem, 64 << 20, &k, &path, Some(b"EXTRA"), Some(&cache)).unwrap();
        assert_eq!(p.size, 4100 + 5);
        assert_eq!(p.addr % 4096, 0);
        // The whole first page is mapped from the file, the last byte copied.
        assert_eq!(mapped, 4096);
        let mut b = [0u8; 9];
        mem.read_slice(&mut b, GuestAddress(p.addr + 4096)).unwrap();
        assert_eq!(&b, b"\x11\0\0\0EXTRA");
        let mut first = [0u8; 4096];
        mem.read_slice(&mut first, GuestAddress(p.addr)).unwrap();
        assert!(first.iter().all(|&x| x == 0x11));
        let (p2, mapped) = load_initrd_file(&mem, 64 << 20, &k, &path, None, None).unwrap();
        assert_eq!((p2.size, mapped), (4097, 0));
        assert_eq!(read_initrd(&path).unwrap().len(), 4097);
        let missing = load_initrd_file(&mem, 64 << 20, &k, Path::new("/nonexistent/i"), None, None);
        assert!(missing.unwrap_err().to_string().contains("--initrd"));
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn cmdline_limits() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut k = fake_kernel(0x80_0000);
        assert_eq!(write_cmdline(&mem, &k, "console=ttyS0").unwrap(), 13);
        assert_eq!(read_cmdline(&mem, 13).unwrap(), "console=ttyS0");
        k.cmdline_limit = 10;
        let e = write_cmdline(&mem, &k, "console=ttyS0").unwrap_err();
        assert!(e.to_string().contains("at most 10"), "{e}");
        assert!(check_cmdline("a\nb", 100).is_err());
    }

    #[test]
    fn cmdline_is_capped_at_ember_s_area_whatever_the_kernel_claims() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut k = fake_kernel(0x80_0000);
        // A bzImage's cmdline_size may claim up to 4 GiB; the area at CMDLINE_START holds
        // 64 KiB, and the kernel itself is loaded at 1 MiB.
        k.cmdline_limit = u32::MAX as usize;
        let fits = "x".repeat(CMDLINE_AREA_LIMIT);
        assert_eq!(write_cmdline(&mem, &k, &fits).unwrap(), CMDLINE_AREA_LIMIT);
        mem.write_slice(b"KERNEL", GuestAddress(HIMEM_START))
            .unwrap();
        let huge = "x".repeat(960 << 10);
        let e = write_cmdline(&mem, &k, &huge).unwrap_err().to_string();
        assert!(e.contains("is 983040 bytes"), "{e}");
        assert!(e.contains("this kernel accepts at most 4294967295"), "{e}");
        assert!(e.contains("command-line area holds at most 65535"), "{e}");
        let mut at_kernel = [0u8; 6];
        mem.read_slice(&mut at_kernel, GuestAddress(HIMEM_START))
            .unwrap();
        assert_eq!(&at_kernel, b"KERNEL");
    }
}
