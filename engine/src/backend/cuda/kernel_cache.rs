//! The kernels NVRTC built, kept on disk between starts.
//!
//! NVRTC takes seconds over the engine's kernels (about 13 s for `engine.cu` as machine code on
//! a 2-core machine), and every process compiled them again: each pod restart, each `bench`
//! run, each of a GPU check's engine runs. An entry holds one source file's PTX and machine
//! code under a name that ends in a SHA-256 of what decides them: the source with its headers
//! pasted in, NVRTC's options, the target and NVRTC's version. A changed kernel, option, target
//! or NVRTC release is therefore a new entry, never a stale one; but NVRTC reports only its
//! major and minor version, so two patch releases of one CUDA minor share entries (clear the
//! directory after such an upgrade for the newer compiler's code).
//!
//! Where ([`location`]): `SPARSEMOE_KERNEL_CACHE` (a directory; `off` or empty for none), else
//! the first of `$XDG_CACHE_HOME/sparsemoe/kernels`, `$HOME/.cache/sparsemoe/kernels` and
//! `$TMPDIR/sparsemoe-kernels-<uid>` that can be written ([`KernelCache::from_env`] tries each).
//! The last is for containers with a read-only root file system, such as the operator's engine
//! pods, whose `/tmp` is an emptyDir that outlives a container restart. Since the engine loads
//! machine code from the cache, a default directory is made with mode 0700 and passed over
//! (on Unix) unless it is a real directory, not a symbolic link, owned by this process's user,
//! with no write permission for group or others; only then is a file written to it, one that
//! must not exist before (so no link is followed). A directory named by
//! `SPARSEMOE_KERNEL_CACHE` is used as it is. An entry is
//! written to a temporary file in the directory and renamed into place, so engines that share
//! the directory (several on a node, on one volume) each read a whole entry or none. An entry
//! that does not read back whole (its marker, lengths, checksum or kind wrong) is a miss: the
//! caller compiles again and rewrites it. A directory that cannot be written costs the compile,
//! never the start. Entries are never removed (a few MB a kernel version and target): clear the
//! directory to take the space back.

use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The first bytes of every entry (the format's version is its last character).
const MAGIC: &[u8; 8] = b"SMOEKRN1";
/// Marker, two lengths, the SHA-256 of those 24 bytes and the payload.
const HEADER: usize = 8 + 8 + 8 + 32;
/// The machine-code length that says there is none (a PTX-only target).
const NO_CUBIN: u64 = u64::MAX;

/// Where the kernel cache goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Location {
    /// No cache (`SPARSEMOE_KERNEL_CACHE` is `off` or empty).
    Off,
    /// The directory `SPARSEMOE_KERNEL_CACHE` names, used as it is.
    Named(PathBuf),
    /// The default directories, best first; the cache goes in the first that can be written.
    /// The last is the one in the shared temporary directory.
    Defaults(Vec<PathBuf>),
}

/// The kernel cache's [`Location`] from `SPARSEMOE_KERNEL_CACHE` (`explicit`), `XDG_CACHE_HOME`,
/// `HOME` and `shared` (this user's directory in the temporary directory), in that order.
pub(crate) fn location(
    explicit: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
    shared: PathBuf,
) -> Location {
    if let Some(dir) = explicit {
        return if dir.is_empty() || dir == "off" {
            Location::Off
        } else {
            Location::Named(PathBuf::from(dir))
        };
    }
    let nonempty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    let xdg = nonempty(xdg_cache_home).map(|cache| cache.join("sparsemoe").join("kernels"));
    let home = nonempty(home).map(|home| home.join(".cache").join("sparsemoe").join("kernels"));
    Location::Defaults(xdg.into_iter().chain(home).chain([shared]).collect())
}

/// This user's directory for the kernel cache in the temporary directory.
fn shared_dir() -> PathBuf {
    #[cfg(unix)]
    // SAFETY: geteuid has no preconditions and cannot fail.
    let name = format!("sparsemoe-kernels-{}", unsafe { libc::geteuid() });
    #[cfg(not(unix))]
    let name = "sparsemoe-kernels".to_string();
    std::env::temp_dir().join(name)
}

/// Makes `dir` (mode 0700) if it is missing and checks that the cache may live there: on Unix,
/// that it is private to this process's user ([`private`]); then that this process can write
/// to it, by making and removing a file that must not exist before.
pub(crate) fn writable(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)?;
    #[cfg(unix)]
    private(dir)?;
    // A probe left by an earlier process of this pid (a container's are alike) is this user's
    // own: the directory is private.
    let probe = dir.join(format!(".probe.{}", std::process::id()));
    let _ = std::fs::remove_file(&probe);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// Whether `dir` is a directory (not a symbolic link to one) owned by this process's user, with
/// no write permission for group or others: no one else can put machine code in it.
#[cfg(unix)]
fn private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            why,
        ))
    };
    let metadata = std::fs::symlink_metadata(dir)?;
    if !metadata.file_type().is_dir() {
        return refuse("not a directory (a symbolic link?)".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = unsafe { libc::geteuid() };
    if metadata.uid() != user {
        return refuse(format!(
            "owned by user {}, not by this process's user {user}",
            metadata.uid()
        ));
    }
    if metadata.mode() & 0o022 != 0 {
        return refuse(format!(
            "group or others may write to it (mode {:o})",
            metadata.mode() & 0o777
        ));
    }
    Ok(())
}

/// The first of the default directories `dirs` that [`writable`] accepts, with why each one
/// before it was passed over.
pub(crate) fn first_writable(dirs: &[PathBuf]) -> (Option<PathBuf>, Vec<String>) {
    let mut passed_over = Vec::new();
    for dir in dirs {
        match writable(dir) {
            Ok(()) => return (Some(dir.clone()), passed_over),
            Err(e) => passed_over.push(format!("{}: {e}", dir.display())),
        }
    }
    (None, passed_over)
}

/// What NVRTC built from one source file: its PTX, and for a machine-code target its CUBIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Image {
    pub ptx: String,
    /// Present for a machine-code target (`sm_XX`), absent for a PTX one.
    pub cubin: Option<Vec<u8>>,
}

/// An entry's name: `{file stem}-{target}-{SHA-256 of its inputs, hex}.bin`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EntryKey(String);

impl EntryKey {
    /// The key of `file` compiled from `source` (headers pasted in) with `options` for
    /// `target` (as `sm_90`) by NVRTC `nvrtc_version`.
    pub fn new(
        file: &str,
        source: &str,
        options: &[String],
        target: &str,
        nvrtc_version: &str,
    ) -> Self {
        let mut hash = Sha256::new();
        // Each input with its length first, so no two lists of inputs hash alike.
        let inputs = [file, source, target, nvrtc_version]
            .into_iter()
            .chain(options.iter().map(String::as_str));
        for input in inputs {
            hash.update((input.len() as u64).to_le_bytes());
            hash.update(input.as_bytes());
        }
        let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let stem = Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("kernels");
        Self(format!("{stem}-{target}-{digest}.bin"))
    }

    /// The entry's file name in the cache's directory.
    pub fn file_name(&self) -> &str {
        &self.0
    }
}

/// A directory of entries.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    /// The cache in `dir`, made when the first entry is written.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache this process's environment names ([`location`]), if any: the named
    /// directory, or the first default one that can be written. Passing over a default one says
    /// so on stderr, once, as does finding none.
    pub fn from_env() -> Option<Self> {
        let dirs = match location(
            std::env::var_os("SPARSEMOE_KERNEL_CACHE"),
            std::env::var_os("XDG_CACHE_HOME"),
            std::env::var_os("HOME"),
            shared_dir(),
        ) {
            Location::Off => return None,
            Location::Named(dir) => return Some(Self::at(dir)),
            Location::Defaults(dirs) => dirs,
        };
        let (dir, passed_over) = first_writable(&dirs);
        if !passed_over.is_empty() {
            let outcome = match &dir {
                Some(dir) => format!("keeping the compiled kernels in {}", dir.display()),
                None => "they are compiled at every start (set SPARSEMOE_KERNEL_CACHE to a \
                         writable directory, or to off)"
                    .into(),
            };
            eprintln!(
                "sparsemoe-engine: kernel cache: passing over {}; {outcome}",
                passed_over.join("; ")
            );
        }
        dir.map(Self::at)
    }

    /// Where the entries are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry under `key` is.
    pub(crate) fn path(&self, key: &EntryKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// The entry under `key`: `Ok(None)` where there is none, an error that says what is wrong
    /// with one that does not read back whole or is not of the kind asked for (`cubin`: whether
    /// the target is machine code).
    pub(crate) fn load(&self, key: &EntryKey, cubin: bool) -> Result<Option<Image>, String> {
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        decode(&bytes, cubin)
            .map(Some)
            .map_err(|why| format!("{}: {why}", path.display()))
    }

    /// Writes `ptx` and `cubin` under `key`: to a temporary file in the directory (made if missing), then
    /// renamed over the entry's name (its own name in this process: the process id and a
    /// count). The temporary file is removed if anything fails.
    pub(crate) fn store(
        &self,
        key: &EntryKey,
        ptx: &str,
        cubin: Option<&[u8]>,
    ) -> std::io::Result<()> {
        static WRITES: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            key.file_name(),
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&encode(ptx, cubin))?;
            f.sync_all()
        });
        let renamed = written.and_then(|()| std::fs::rename(&tmp, self.path(key)));
        if renamed.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        renamed
    }
}

fn encode(ptx: &str, cubin: Option<&[u8]>) -> Vec<u8> {
    let machine_code = cubin.unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + ptx.len() + machine_code.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(ptx.len() as u64).to_le_bytes());
    let cubin_len = cubin.map_or(NO_CUBIN, |c| c.len() as u64);
    out.extend_from_slice(&cubin_len.to_le_bytes());
    let digest = checksum(&[&out, ptx.as_bytes(), machine_code]);
    out.extend_from_slice(&digest);
    out.extend_from_slice(ptx.as_bytes());
    out.extend_from_slice(machine_code);
    out
}

/// The SHA-256 of an entry's marker and lengths (24 bytes) and its payload, in `parts`.
fn checksum(parts: &[&[u8]]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
    }
    hash.finalize().into()
}

fn decode(bytes: &[u8], want_cubin: bool) -> Result<Image, String> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err("not a kernel cache entry of this version".into());
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (ptx_len, cubin_len) = (word(8), word(16));
    let payload = &bytes[HEADER..];
    let cubin_bytes = if cubin_len == NO_CUBIN { 0 } else { cubin_len };
    if ptx_len.checked_add(cubin_bytes) != Some(payload.len() as u64) {
        return Err(format!(
            "{} bytes of payload, where its header says {ptx_len} of PTX and {cubin_bytes} of \
             machine code",
            payload.len()
        ));
    }
    if checksum(&[&bytes[..24], payload]).as_slice() != &bytes[24..HEADER] {
        return Err("its checksum does not match".into());
    }
    if want_cubin == (cubin_len == NO_CUBIN) {
        return Err(format!(
            "it holds {}machine code, and the target asks for {}",
            if cubin_len == NO_CUBIN { "no " } else { "" },
            if want_cubin { "some" } else { "none" }
        ));
    }
    let (ptx, cubin) = payload.split_at(ptx_len as usize);
    let ptx = String::from_utf8(ptx.to_vec()).map_err(|_| "its PTX is not UTF-8".to_string())?;
    Ok(Image {
        ptx,
        cubin: (cubin_len != NO_CUBIN).then(|| cubin.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(cubin: bool) -> Image {
        Image {
            ptx: ".version 9.0\n.target sm_90\n.entry k() {}\n".into(),
            cubin: cubin.then(|| b"\x7fELF\x02\x01\x01machine code".to_vec()),
        }
    }

    fn store(cache: &KernelCache, key: &EntryKey, image: &Image) -> std::io::Result<()> {
        cache.store(key, &image.ptx, image.cubin.as_deref())
    }

    fn key(target: &str) -> EntryKey {
        EntryKey::new(
            "engine.cu",
            "__global__ void k() {}",
            &["-std=c++17".into()],
            target,
            "13.0",
        )
    }

    #[test]
    fn an_entry_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::at(dir.path().join("made/on/demand"));
        for (target, cubin) in [("sm_90", true), ("compute_90", false)] {
            let key = key(target);
            assert_eq!(cache.load(&key, cubin), Ok(None), "{target}: before");
            store(&cache, &key, &image(cubin)).unwrap();
            assert_eq!(cache.load(&key, cubin), Ok(Some(image(cubin))), "{target}");
            // Written again (another engine compiled it too): still whole.
            store(&cache, &key, &image(cubin)).unwrap();
            assert_eq!(cache.load(&key, cubin), Ok(Some(image(cubin))), "{target}");
        }
        // The two entries and nothing else: no temporary file is left behind.
        let mut names: Vec<_> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].starts_with("engine-compute_90-") && names[0].ends_with(".bin"));
        assert!(names[1].starts_with("engine-sm_90-"), "{names:?}");
    }

    #[test]
    fn every_input_of_the_compile_changes_the_key() {
        let base = key("sm_90");
        assert_eq!(base, key("sm_90"));
        let options = ["-std=c++17".to_string()];
        let changed = [
            EntryKey::new(
                "topk.cu",
                "__global__ void k() {}",
                &options,
                "sm_90",
                "13.0",
            ),
            EntryKey::new(
                "engine.cu",
                "__global__ void k2() {}",
                &options,
                "sm_90",
                "13.0",
            ),
            EntryKey::new(
                "engine.cu",
                "__global__ void k() {}",
                &["-std=c++20".into()],
                "sm_90",
                "13.0",
            ),
            EntryKey::new("engine.cu", "__global__ void k() {}", &[], "sm_90", "13.0"),
            key("sm_80"),
            EntryKey::new(
                "engine.cu",
                "__global__ void k() {}",
                &options,
                "sm_90",
                "13.1",
            ),
        ];
        // The same bytes split differently between inputs.
        let split = |options: &[&str]| {
            let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
            EntryKey::new("engine.cu", "k", &options, "sm_90", "13.0")
        };
        assert_ne!(split(&["-a", "-b"]), split(&["-a-b"]));
        assert_ne!(split(&["-a", ""]), split(&["", "-a"]));
        for (i, other) in changed.iter().enumerate() {
            assert_ne!(&base, other, "change {i}");
            for later in &changed[i + 1..] {
                assert_ne!(other, later);
            }
        }
    }

    #[test]
    fn a_damaged_or_foreign_entry_is_refused_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::at(dir.path());
        let key = key("sm_90");
        store(&cache, &key, &image(true)).unwrap();
        let whole = std::fs::read(cache.path(&key)).unwrap();
        let damage = |bytes: &[u8]| {
            std::fs::write(cache.path(&key), bytes).unwrap();
            cache.load(&key, true).unwrap_err()
        };
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(damage(&flipped).contains("checksum"));
        // Lengths that still add up, moved between PTX and machine code.
        let mut moved = whole.clone();
        let ptx_len = u64::from_le_bytes(moved[8..16].try_into().unwrap());
        let cubin_len = u64::from_le_bytes(moved[16..24].try_into().unwrap());
        moved[8..16].copy_from_slice(&(ptx_len + 1).to_le_bytes());
        moved[16..24].copy_from_slice(&(cubin_len - 1).to_le_bytes());
        assert!(damage(&moved).contains("checksum"));
        assert!(damage(&whole[..whole.len() - 3]).contains("bytes of payload"));
        assert!(damage(&whole[..20]).contains("not a kernel cache entry"));
        assert!(damage(b"").contains("not a kernel cache entry"));
        let mut foreign = whole.clone();
        foreign[7] = b'2';
        assert!(damage(&foreign).contains("not a kernel cache entry"));
        // A length that would overflow the sum.
        let mut huge = whole.clone();
        huge[8..16].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(damage(&huge).contains("bytes of payload"));
        // Whole, but PTX only where the target wants machine code, and the other way round.
        std::fs::write(cache.path(&key), &whole).unwrap();
        assert!(
            cache
                .load(&key, false)
                .unwrap_err()
                .contains("asks for none")
        );
        store(&cache, &key, &image(false)).unwrap();
        assert!(
            cache
                .load(&key, true)
                .unwrap_err()
                .contains("no machine code")
        );
    }

    #[test]
    fn a_cache_that_cannot_be_written_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let cache = KernelCache::at(file.join("kernels"));
        assert!(store(&cache, &key("sm_90"), &image(true)).is_err());
        assert!(cache.load(&key("sm_90"), true).is_err());
    }

    #[test]
    fn the_directory_comes_from_the_environment_in_order() {
        let s = |v: &str| Some(OsString::from(v));
        let shared = "/tmp/sparsemoe-kernels-1000";
        let at = |explicit, xdg, home| location(explicit, xdg, home, PathBuf::from(shared));
        let defaults = |dirs: &[&str]| Location::Defaults(dirs.iter().map(PathBuf::from).collect());
        assert_eq!(
            at(s("/cache"), s("/xdg"), s("/home/u")),
            Location::Named("/cache".into())
        );
        assert_eq!(at(s("off"), s("/xdg"), s("/home/u")), Location::Off);
        assert_eq!(at(s(""), s("/xdg"), s("/home/u")), Location::Off);
        assert_eq!(
            at(None, s("/xdg"), s("/home/u")),
            defaults(&[
                "/xdg/sparsemoe/kernels",
                "/home/u/.cache/sparsemoe/kernels",
                shared
            ])
        );
        assert_eq!(
            at(None, s(""), s("/home/u")),
            defaults(&["/home/u/.cache/sparsemoe/kernels", shared])
        );
        assert_eq!(at(None, None, s("")), defaults(&[shared]));
        assert_eq!(at(None, None, None), defaults(&[shared]));
    }

    #[test]
    fn an_unwritable_default_directory_is_passed_over_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let shared = dir.path().join("tmp/sparsemoe-kernels-1000");
        let dirs = [
            file.join("kernels"),
            dir.path().join("home/kernels"),
            shared.clone(),
        ];
        let (chosen, passed_over) = first_writable(&dirs);
        assert_eq!(chosen.as_ref(), Some(&dirs[1]));
        assert_eq!(passed_over.len(), 1, "{passed_over:?}");
        assert!(passed_over[0].contains("a-file"), "{passed_over:?}");
        // The first usable one is made; the ones after it are not touched.
        assert!(dirs[1].is_dir() && !shared.exists());
        // Nothing writable but the shared one: it is made, private to this user.
        let (chosen, passed_over) = first_writable(&[file.join("kernels"), shared.clone()]);
        assert_eq!((chosen.as_ref(), passed_over.len()), (Some(&shared), 1));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{mode:o}");
        }
        // A cache that stores there reads its entry back, and the probe is gone.
        let cache = KernelCache::at(&shared);
        store(&cache, &key("sm_90"), &image(true)).unwrap();
        assert_eq!(cache.load(&key("sm_90"), true), Ok(Some(image(true))));
        let names: Vec<_> = std::fs::read_dir(&shared).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_others_may_write_to_or_a_link_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("sparsemoe-kernels-1000");
        std::fs::create_dir(&shared).unwrap();
        // Made by someone else first, writable by everyone: its machine code is not trusted.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = writable(&shared).unwrap_err().to_string();
        assert!(
            refused.contains("others may write") && refused.contains("777"),
            "{refused}"
        );
        let (chosen, passed_over) = first_writable(std::slice::from_ref(&shared));
        assert_eq!(chosen, None);
        assert!(
            passed_over[0].contains("others may write"),
            "{passed_over:?}"
        );
        // Private again, it is accepted.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(writable(&shared).is_ok());
        // A symbolic link to a private directory is not one.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        let refused = writable(&link).unwrap_err().to_string();
        assert!(refused.contains("not a directory"), "{refused}");
        // A probe left behind under this process's id, even a link, is replaced, not followed.
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let probe = shared.join(format!(".probe.{}", std::process::id()));
        std::os::unix::fs::symlink(&target, &probe).unwrap();
        assert!(writable(&shared).is_ok());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert!(
            std::fs::symlink_metadata(&probe).is_err(),
            "the probe is left"
        );
    }
}
