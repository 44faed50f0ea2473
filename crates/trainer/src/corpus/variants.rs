//! Patch variants of the corpus target's functions: benign ones (the
//! original at other optimisation levels, added logging, hand-written
//! equivalent rewrites) and harmful ones (each mutation operator at each
//! site it applies to). Deterministic: the seed picks among an operator's
//! alternatives (off by +1 or -1, which wrong value to return), nothing
//! else varies. Each variant compiles into a patch object and a manifest
//! in a cache directory.

use super::template::{FunctionTemplate, Site, Templates};
use super::VariantKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64;

/// The optimisation levels of the "optimisation-level" variants.
pub const OPTIMISATION_LEVELS: &[&str] = &["-O0", "-O1", "-O2", "-O3", "-Os"];
/// The levels the equivalent rewrites are built at.
pub const REWRITE_LEVELS: &[&str] = &["-O2", "-O1"];
/// The suffix of the replacement function's name in a patch object.
pub const REPLACEMENT_SUFFIX: &str = "_patch";

/// One patch variant of one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// `function.kind.detail`, also the patch id (1-64 of `[A-Za-z0-9._-]`).
    pub id: String,
    pub function: String,
    pub kind: VariantKind,
    /// What was changed, for people (`OP(>) -> >= at site 2`).
    pub description: String,
    /// The whole C source of the patch object.
    pub source: String,
    pub optimisation: String,
}

impl Variant {
    /// What identifies the variant's code: a hash of its source, its
    /// optimisation level and the target's source (labels are cached by it).
    pub fn hash(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.source.as_bytes());
        hasher.update(self.optimisation.as_bytes());
        hasher.update(shadowpatch_fixtures::CORPUS_TARGET_SOURCE.as_bytes());
        hasher.finalize().to_hex()[..16].to_string()
    }

    /// The name of the replacement function in the patch object.
    pub fn replacement(&self) -> String {
        format!("{}{REPLACEMENT_SUFFIX}", self.function)
    }
}

/// A variant compiled: its object and a manifest for a given target.
#[derive(Debug, Clone)]
pub struct BuiltVariant {
    pub variant: Variant,
    pub object: PathBuf,
    pub manifest: PathBuf,
}

/// Every variant of every function, in a fixed order.
pub fn generate(templates: &Templates, seed: u64) -> Vec<Variant> {
    let mut variants = Vec::new();
    for function in &templates.functions {
        variants.extend(benign(templates, function, seed));
        variants.extend(harmful(templates, function, seed));
    }
    variants
}

/// The variants kept by `--limit`: a seeded, stratified pick (every
/// function and kind keeps its share), in generation order.
pub fn limit(variants: Vec<Variant>, limit: Option<usize>, seed: u64) -> Vec<Variant> {
    let Some(limit) = limit.filter(|l| *l < variants.len()) else {
        return variants;
    };
    let mut ranked: Vec<(u64, usize)> = variants
        .iter()
        .enumerate()
        .map(|(index, v)| (seeded(seed, &v.id), index))
        .collect();
    ranked.sort();
    let mut keep: Vec<usize> = ranked.into_iter().take(limit).map(|(_, index)| index).collect();
    keep.sort();
    let mut variants: Vec<Option<Variant>> = variants.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|index| variants[index].take()).collect()
}

/// A hash of `seed` and `what`: the generator's only source of choice.
pub fn seeded(seed: u64, what: &str) -> u64 {
    xxh3_64(format!("{seed}:{what}").as_bytes())
}

fn source(prelude: &str, function: &str, text: &str) -> String {
    let renamed = text.replacen(&format!("{function}("), &format!("{function}{REPLACEMENT_SUFFIX}("), 1);
    format!("/* shadowpatch corpus variant of {function} */\n{prelude}\n{renamed}")
}

fn variant(
    templates: &Templates,
    function: &FunctionTemplate,
    kind: VariantKind,
    detail: &str,
    description: String,
    text: &str,
    optimisation: &str,
) -> Variant {
    Variant {
        id: format!("{}.{}.{detail}", function.name, kind.as_str()),
        function: function.name.clone(),
        kind,
        description,
        source: source(&templates.prelude, &function.name, text),
        optimisation: optimisation.to_string(),
    }
}

fn replace_site(text: &str, site: &Site, with: &str) -> String {
    format!("{}{with}{}", &text[..site.start], &text[site.end..])
}

/// The optimisation level of a mutation or logging variant, picked by the
/// seed among all levels: if harmful variants were all built at one level
/// and benign ones at several, code size alone would give the label away.
fn level(seed: u64, function: &FunctionTemplate, site: usize, operator: &str, detail: &str) -> &'static str {
    let choice = seeded(seed, &format!("{}:{site}:{operator}:{detail}", function.name));
    OPTIMISATION_LEVELS[(choice % OPTIMISATION_LEVELS.len() as u64) as usize]
}

fn benign(templates: &Templates, function: &FunctionTemplate, seed: u64) -> Vec<Variant> {
    let mut found = Vec::new();
    for level in OPTIMISATION_LEVELS {
        found.push(variant(
            templates,
            function,
            VariantKind::OptimisationLevel,
            level.trim_start_matches('-'),
            format!("the original compiled with {level}"),
            &function.text,
            level,
        ));
    }
    let entry = function
        .sites
        .iter()
        .find(|s| s.macro_name == "ENTRY")
        .expect("every template has an ENTRY site");
    let line = format!("{} called\\n", function.name);
    let logging = [
        (
            "every-call",
            format!(
                "do {{ static const char line[] = \"{line}\"; (void)!write(2, line, sizeof line - 1); }} while (0)"
            ),
            "writes a line to stderr on every call",
        ),
        (
            "sampled",
            format!(
                "do {{ static unsigned long calls; static const char line[] = \"{line}\"; \
                 if ((++calls & 0xffff) == 0) (void)!write(2, line, sizeof line - 1); }} while (0)"
            ),
            "counts calls in a static variable and writes a line every 65536",
        ),
    ];
    for (detail, code, description) in logging {
        found.push(variant(
            templates,
            function,
            VariantKind::Logging,
            detail,
            description.to_string(),
            &replace_site(&function.text, entry, &code),
            level(seed, function, 0, "logging", detail),
        ));
    }
    for (tag, text) in &function.rewrites {
        for level in REWRITE_LEVELS {
            found.push(variant(
                templates,
                function,
                VariantKind::EquivalentRewrite,
                &format!("{tag}{level}"),
                format!("hand-written rewrite \"{tag}\" at {level}"),
                text,
                level,
            ));
        }
    }
    found
}

/// The operator flips of an `OP` site's operator.
fn flips(operator: &str) -> &'static [&'static str] {
    match operator {
        "<" => &["<=", ">"],
        "<=" => &["<"],
        ">" => &[">=", "<"],
        ">=" => &[">"],
        "==" => &["!="],
        "!=" => &["=="],
        "+" => &["-"],
        "-" => &["+"],
        "*" => &["+"],
        "^" => &["|"],
        "&" => &["|"],
        "|" => &["&"],
        "&&" => &["||"],
        "||" => &["&&"],
        _ => &[],
    }
}

fn harmful(templates: &Templates, function: &FunctionTemplate, seed: u64) -> Vec<Variant> {
    let mut found = Vec::new();
    for (index, site) in function.sites.iter().enumerate() {
        let at = |with: &str| replace_site(&function.text, site, with);
        let call = &function.text[site.start..site.end];
        match site.macro_name {
            "OP" => {
                for (alternative, flipped) in flips(site.argument.trim()).iter().enumerate() {
                    found.push(variant(
                        templates,
                        function,
                        VariantKind::OperatorFlip,
                        &format!("{index}{}", (b'a' + alternative as u8) as char),
                        format!("{call} -> {flipped} at site {index}"),
                        &at(flipped),
                        level(seed, function, index, "flip", flipped),
                    ));
                }
            }
            "BOUND" => {
                for (detail, delta) in [("up", "+ 1"), ("down", "- 1")] {
                    found.push(variant(
                        templates,
                        function,
                        VariantKind::OffByOne,
                        &format!("{index}{detail}"),
                        format!("{call} -> ({}) {delta} at site {index}", site.argument),
                        &at(&format!("(({}) {delta})", site.argument)),
                        level(seed, function, index, "bound", detail),
                    ));
                }
            }
            "RET" => {
                let argument = site.argument.trim();
                for wrong in ["0", "-1", "1"].into_iter().filter(|c| *c != argument).take(2) {
                    found.push(variant(
                        templates,
                        function,
                        VariantKind::WrongReturn,
                        &format!("{index}v{}", wrong.replace('-', "m")),
                        format!("{call} -> {wrong} at site {index}"),
                        &at(&format!("({wrong})")),
                        level(seed, function, index, "return", wrong),
                    ));
                }
            }
            "STEP" => found.push(variant(
                templates,
                function,
                VariantKind::InfiniteLoop,
                &index.to_string(),
                format!("{call} removed: the loop no longer advances (site {index})"),
                &at("(void)0"),
                level(seed, function, index, "step", ""),
            )),
            "GUARD" => found.push(variant(
                templates,
                function,
                VariantKind::NullDereference,
                &index.to_string(),
                format!("{call} removed: the NULL (or zero) check is gone (site {index})"),
                &at(""),
                level(seed, function, index, "guard", ""),
            )),
            "FREE" => found.push(variant(
                templates,
                function,
                VariantKind::Leak,
                &index.to_string(),
                format!("{call} removed: the temporary is never freed (site {index})"),
                &at(""),
                level(seed, function, index, "free", ""),
            )),
            "ENTRY" => found.push(variant(
                templates,
                function,
                VariantKind::Leak,
                &index.to_string(),
                "allocates 64 bytes on every call and never frees them".to_string(),
                &at("do { void *volatile leaked = malloc(64); (void)leaked; } while (0)"),
                level(seed, function, index, "leak", ""),
            )),
            _ => {}
        }
    }
    // Changed struct use: the patch's copy of a struct the function uses
    // has its fields in another order.
    let prelude_sites = super::template::find_sites(&templates.prelude, 0).unwrap_or_default();
    for site in prelude_sites.iter().filter(|s| s.macro_name == "LAYOUT") {
        let struct_name = templates.prelude[..site.start]
            .rsplit("struct ")
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default();
        if struct_name.is_empty() || !function.text.contains(&format!("struct {struct_name}")) {
            continue;
        }
        let mut fields: Vec<&str> = site
            .argument
            .split(';')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        fields.rotate_left(1);
        let layout = fields.iter().map(|f| format!("{f};")).collect::<Vec<_>>().join(" ");
        let prelude = replace_site(&templates.prelude, site, &layout);
        found.push(Variant {
            id: format!("{}.{}.{struct_name}", function.name, VariantKind::StructLayout.as_str()),
            function: function.name.clone(),
            kind: VariantKind::StructLayout,
            description: format!("struct {struct_name} declared with its fields rotated: {layout}"),
            source: source(&prelude, &function.name, &function.text),
            optimisation: level(seed, function, 0, "layout", struct_name).to_string(),
        });
    }
    found
}

/// Compile `variant` into `cache_dir/objects` (cached by source and level)
/// and write its manifest for the module with `build_id`.
pub fn build(variant: &Variant, cache_dir: &Path, build_id: &str) -> std::io::Result<BuiltVariant> {
    let objects = cache_dir.join("objects");
    let object =
        shadowpatch_fixtures::build_c_patch_with(&objects, &variant.id, &variant.source, &variant.optimisation)?;
    let manifests = cache_dir.join("manifests").join(build_id);
    std::fs::create_dir_all(&manifests)?;
    let manifest = manifests.join(format!("{}.toml", variant.id));
    let text = format!(
        "id = {:?}\nobject = {:?}\n[target]\nbuild_id = {:?}\n[[replace]]\nsymbol = {:?}\nwith = {:?}\n",
        variant.id,
        object.display().to_string(),
        build_id,
        variant.function,
        variant.replacement()
    );
    std::fs::write(&manifest, text)?;
    Ok(BuiltVariant {
        variant: variant.clone(),
        object,
        manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn generation_is_deterministic_covers_every_kind_and_ids_are_unique_patch_ids() {
        let templates = Templates::corpus_target();
        let variants = generate(&templates, 7);
        assert_eq!(variants, generate(&templates, 7));
        let ids: BTreeSet<&str> = variants.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(ids.len(), variants.len(), "unique ids");
        for id in &ids {
            assert!(
                id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "{id}"
            );
        }
        let mut kinds: BTreeMap<VariantKind, usize> = BTreeMap::new();
        for v in &variants {
            *kinds.entry(v.kind).or_default() += 1;
            assert!(v.source.contains(&format!("{}_patch(", v.function)), "{}", v.id);
        }
        for kind in VariantKind::ALL {
            assert!(kinds.get(&kind).copied().unwrap_or(0) > 0, "no {kind:?} variant");
        }
        assert!(variants.len() >= 240, "{} variants", variants.len());
        let off_by_one = variants.iter().find(|v| v.id == "clamp_add.off-by-one.3up").unwrap();
        assert!(off_by_one.source.contains("((1000000) + 1)"), "{}", off_by_one.source);
        let limited = limit(variants.clone(), Some(40), 7);
        assert_eq!(limited.len(), 40);
        assert_eq!(limited, limit(variants, Some(40), 7));
    }
}
