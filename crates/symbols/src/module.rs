//! Modules of a live process: each ELF file mapped at offset 0, with every
//! later mapping of the same file, its load bias and its parsed image.

use crate::{hex, ElfImage, Symbol, SymbolsError};
use shadowpatch_process::{Mapping, MappingKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A loaded ELF module (the executable or a shared library).
#[derive(Debug, Clone)]
pub struct Module {
    /// File name (`libc.so.6`).
    pub name: String,
    /// Path as the target's /proc/PID/maps shows it.
    pub path: PathBuf,
    pub inode: u64,
    /// Runtime address of the module's first byte.
    pub base: u64,
    /// End of the module's last mapping.
    pub end: u64,
    /// Runtime address = file virtual address + bias.
    pub bias: u64,
    /// Address ranges of this module's mappings.
    pub ranges: Vec<(u64, u64)>,
    pub image: Arc<ElfImage>,
    /// Whether this is the process's main executable.
    pub main: bool,
    /// For the main executable, the names it was started by: argv[0] as
    /// given and its last component, and the comm (a command run through a
    /// symlink, `/usr/sbin/foo -> bar`, is known by `foo`). Empty for
    /// libraries.
    pub started_as: Vec<String>,
}

impl Module {
    pub fn build_id_hex(&self) -> Option<String> {
        self.image.build_id.as_deref().map(hex)
    }

    pub fn contains(&self, address: u64) -> bool {
        self.ranges.iter().any(|(start, end)| (*start..*end).contains(&address))
    }

    /// Symbol containing runtime `address`, with the offset into it.
    pub fn symbolize(&self, address: u64) -> Option<(&Symbol, u64)> {
        self.image.symbols.symbolize(address.checked_sub(self.bias)?)
    }

    /// Runtime addresses of every symbol named `name`.
    pub fn symbol_addresses(&self, name: &str) -> Vec<(u64, &Symbol)> {
        self.image
            .symbols
            .by_name(name)
            .into_iter()
            .map(|s| (s.address + self.bias, s))
            .collect()
    }

    /// This module with `extra` symbols added (file addresses, as in the
    /// ELF); an added symbol hides every other symbol of its name, so a
    /// name that was ambiguous or absent designates exactly what was added.
    pub fn with_symbols(&self, extra: Vec<Symbol>) -> Module {
        if extra.is_empty() {
            return self.clone();
        }
        let hidden: std::collections::HashSet<&str> = extra.iter().map(|s| s.name.as_str()).collect();
        let mut symbols: Vec<Symbol> = self
            .image
            .symbols
            .iter()
            .filter(|s| !hidden.contains(s.name.as_str()))
            .cloned()
            .collect();
        symbols.extend(extra);
        let mut image = (*self.image).clone();
        image.symbols = crate::SymbolTable::new(symbols);
        Module {
            image: Arc::new(image),
            ..self.clone()
        }
    }

    /// Whether a name given by a user designates this module — the one
    /// matching used by the manifest's `target.module`, `--module`,
    /// `lookup` and `--guard MODULE!SYM`: the file name, its name without
    /// version suffixes (and without `lib`), its path (or a symlink to it),
    /// its `DT_SONAME` (and that without version), and for the main
    /// executable the name it was started by.
    pub fn matches_name(&self, wanted: &str) -> bool {
        if wanted.is_empty() {
            return false;
        }
        let file_names = std::iter::once(self.name.as_str()).chain(self.image.soname.as_deref());
        for name in file_names {
            if name == wanted
                || name.split(".so").next() == Some(wanted)
                || name.strip_prefix("lib").and_then(|n| n.split(".so").next()) == Some(wanted)
            {
                return true;
            }
        }
        if self.path == Path::new(wanted) || self.started_as.iter().any(|name| name == wanted) {
            return true;
        }
        // A path that is a symlink to this module's file.
        wanted.contains('/') && std::fs::canonicalize(wanted).is_ok_and(|real| real == self.path)
    }
}

/// The names the main executable of `pid` was started by (see
/// [`Module::started_as`]).
fn started_as(pid: i32) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0).into_owned();
        if !argv0.is_empty() {
            if let Some(last) = Path::new(&argv0).file_name() {
                names.push(last.to_string_lossy().into_owned());
            }
            names.push(argv0);
        }
    }
    if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        names.push(comm.trim_end_matches('\n').to_string());
    }
    names.retain(|n| !n.is_empty());
    names.dedup();
    names
}

/// Discover the modules of process `pid` from its memory map.
pub fn modules_of(pid: i32, maps: &[Mapping]) -> Result<Vec<Module>, SymbolsError> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    // The executable's inode identifies it even when its path was replaced.
    let exe_inode = std::fs::metadata(format!("/proc/{pid}/exe")).map(|m| m.ino()).ok();
    let mut modules: Vec<Module> = Vec::new();
    // Path → index of the module currently open for that file.
    let mut open: HashMap<(PathBuf, u64), usize> = HashMap::new();
    for mapping in maps {
        let MappingKind::File(path) = &mapping.kind else {
            continue;
        };
        let key = (path.clone(), mapping.inode);
        if mapping.offset == 0 {
            let Some(image) = load_image(pid, mapping, path) else {
                // Not an ELF module (locale archive, fonts, data files).
                continue;
            };
            let image = match image {
                Ok(image) => image,
                // Another architecture or a malformed mapped ELF: not ours to mirror.
                Err(SymbolsError::WrongArchitecture { .. }) | Err(SymbolsError::Malformed { .. }) => continue,
                Err(other) => return Err(other),
            };
            let bias = mapping.start.wrapping_sub(image.first_load_address());
            let main = exe.as_deref() == Some(path.as_path()) || exe_inode == Some(mapping.inode);
            modules.push(Module {
                name: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path: path.clone(),
                inode: mapping.inode,
                base: mapping.start,
                end: mapping.end,
                bias,
                ranges: vec![(mapping.start, mapping.end)],
                image,
                main,
                started_as: if main { started_as(pid) } else { Vec::new() },
            });
            open.insert(key, modules.len() - 1);
        } else if let Some(&index) = open.get(&key) {
            let module = &mut modules[index];
            module.end = module.end.max(mapping.end);
            module.ranges.push((mapping.start, mapping.end));
        }
    }
    Ok(modules)
}

/// Parse the file behind `mapping`. Reads it through /proc/PID/map_files,
/// which names the very inode mapped (even if the path was since replaced
/// or deleted), falling back to the path inside the target's root.
/// `None` when the file is not an ELF file at all.
/// Files parsed already are shared (see [`ImageCache`]).
fn load_image(pid: i32, mapping: &Mapping, path: &Path) -> Option<Result<Arc<ElfImage>, SymbolsError>> {
    let by_inode = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", mapping.start, mapping.end));
    let key = FileKey::of(&by_inode, path);
    if let Some(image) = key.as_ref().and_then(|key| IMAGES.get(key)) {
        return Some(Ok(image));
    }
    // One thread parses a file at a time: the others that miss it meanwhile
    // (a host-wide apply's workers all start on the same glibc) wait, then
    // find it cached, instead of each parsing it (glibc with its debug
    // symbols takes milliseconds; sixteen parses of it were 4 % of a
    // 1,000-process apply's CPU).
    let _parsing = key.as_ref().map(|key| PARSING.claim(key));
    if let Some(image) = key.as_ref().and_then(|key| IMAGES.get(key)) {
        return Some(Ok(image));
    }
    let loaded = read_image(pid, &by_inode, path)?;
    Some(loaded.map(|image| {
        let image = Arc::new(image);
        match key {
            Some(key) => IMAGES.put(key, image),
            None => image,
        }
    }))
}

/// What identifies a file's contents without reading it: the mapped
/// inode's device, number, size and change times (a file rewritten in
/// place changes its mtime and ctime), and the path the image names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    device: u64,
    inode: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    path: PathBuf,
}

impl FileKey {
    /// The key of the file `by_inode` (a /proc/PID/map_files link) leads to.
    pub(crate) fn of(by_inode: &Path, path: &Path) -> Option<FileKey> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(by_inode).ok()?;
        Some(FileKey {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            path: path.to_path_buf(),
        })
    }
}

/// Parsed module files, shared by every process that maps the same file:
/// a host-wide apply reads glibc's symbols once, not once per process.
/// Bounded (the least recently used file goes first), so a long-lived
/// agent keeps at most [`ImageCache::CAPACITY`] images.
struct ImageCache {
    entries: std::sync::Mutex<Vec<CachedImage>>,
}

/// A cached image: its file, the parsed image, and its debug file's stamp
/// ([`debug_stamp`]) when it was parsed.
type CachedImage = (FileKey, Arc<ElfImage>, Option<(u64, i128)>);

/// The installed debug file of `image`'s build-id: inode and mtime.
pub(crate) fn debug_stamp(image: &ElfImage) -> Option<(u64, i128)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(debug_file_path(image)?).ok()?;
    Some((
        meta.ino(),
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    ))
}

/// Where the debug file of `image`'s build-id would be installed.
fn debug_file_path(image: &ElfImage) -> Option<PathBuf> {
    let id = image.build_id.as_deref().filter(|id| id.len() > 1)?;
    let hex_id = hex(id);
    Some(PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &hex_id[..2],
        &hex_id[2..]
    )))
}

static IMAGES: ImageCache = ImageCache {
    entries: std::sync::Mutex::new(Vec::new()),
};

impl ImageCache {
    const CAPACITY: usize = 32;

    /// The image of `key`, if parsed already and its debug file (whose
    /// symbols it merged) is still the one it read, or still absent.
    fn get(&self, key: &FileKey) -> Option<Arc<ElfImage>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let at = entries.iter().position(|(k, _, _)| k == key)?;
        let entry = entries.remove(at);
        if debug_stamp(&entry.1) != entry.2 {
            return None;
        }
        let image = entry.1.clone();
        entries.push(entry);
        Some(image)
    }

    /// Keep `image` as `key`'s, and return the image every caller is to
    /// share: one parsed meanwhile by another thread (workers of a
    /// host-wide apply parse the same glibc at once) stays, and is returned
    /// instead, so that all of them hold the same image.
    fn put(&self, key: FileKey, image: Arc<ElfImage>) -> Arc<ElfImage> {
        let stamp = debug_stamp(&image);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = entries.iter().position(|(k, _, s)| *k == key && *s == stamp) {
            let entry = entries.remove(at);
            let kept = entry.1.clone();
            entries.push(entry);
            return kept;
        }
        entries.retain(|(k, _, _)| *k != key);
        if entries.len() >= Self::CAPACITY {
            entries.remove(0);
        }
        entries.push((key, image.clone(), stamp));
        image
    }
}

/// The files being parsed now, each by one thread.
static PARSING: crate::claim::Claims<FileKey> = crate::claim::Claims::new();

/// Read and parse the file behind a mapping (with its debug file's
/// symbols when one is installed).
fn read_image(pid: i32, by_inode: &Path, path: &Path) -> Option<Result<ElfImage, SymbolsError>> {
    let in_root = PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path));
    let bytes = std::fs::read(by_inode).or_else(|_| std::fs::read(&in_root));
    let bytes = match bytes {
        Ok(bytes) => bytes,
        // Both paths go through /proc/PID: a target that died since its
        // maps were read makes them vanish. Say that, not which file.
        Err(_) if shadowpatch_process::ProcessIdentity::of(pid).is_err() => {
            return Some(Err(SymbolsError::Target(shadowpatch_process::TargetError::Exited {
                pid,
                during: "its modules were being read",
            })))
        }
        Err(source) => {
            return Some(Err(SymbolsError::Io {
                path: path.to_path_buf(),
                source,
            }))
        }
    };
    if !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    let mut image = match ElfImage::parse(path, &bytes) {
        Ok(image) => image,
        Err(error) => return Some(Err(error)),
    };
    if let Some(debug_file) = debug_file_path(&image) {
        if let Ok(debug) = ElfImage::open(&debug_file) {
            image.merge_debug_symbols(debug);
        }
    }
    Some(Ok(image))
}

/// Where an address lies: module, symbol and offset, and the one-line form.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    pub module: Option<String>,
    pub symbol: Option<String>,
    pub offset: Option<u64>,
    /// `module!symbol+0x12`, `module+0x1234` or `?`.
    pub location: String,
}

impl Location {
    pub fn of(address: u64, modules: &[Module]) -> Location {
        let Some(module) = modules.iter().find(|m| m.contains(address)) else {
            return Location {
                module: None,
                symbol: None,
                offset: None,
                location: "?".into(),
            };
        };
        match module.symbolize(address) {
            Some((symbol, offset)) => Location {
                module: Some(module.name.clone()),
                symbol: Some(symbol.name.clone()),
                offset: Some(offset),
                location: format!("{}!{}+{offset:#x}", module.name, symbol.name),
            },
            None => {
                // Say where it lies, so padding after a function is not
                // read as part of it.
                let relative = address.checked_sub(module.bias).unwrap_or(address);
                let between = match module.image.symbols.neighbours(relative) {
                    (Some(before), Some(after)) => format!(" (between {} and {})", before.name, after.name),
                    (Some(before), None) => format!(" (after {})", before.name),
                    (None, Some(after)) => format!(" (before {})", after.name),
                    (None, None) => String::new(),
                };
                Location {
                    module: Some(module.name.clone()),
                    symbol: None,
                    offset: None,
                    location: format!("{}+{:#x}{between}", module.name, address - module.base),
                }
            }
        }
    }

    /// A location inside a region of no module (patch code, `[anon]`).
    pub fn in_region(name: &str, region_start: u64, address: u64) -> Location {
        Location {
            module: Some(name.to_string()),
            symbol: None,
            offset: None,
            location: format!("{name}+{:#x}", address - region_start),
        }
    }
}
