//! `config.json`'s `quantization_config`: the two FP8 layouts people publish.
//!
//! - compressed-tensors (`quant_method: "compressed-tensors"`, `format: "float-quantized"`):
//!   `config_groups.*.weights` 8-bit float with `strategy` `tensor` or `channel`;
//!   `input_activations` static per tensor, dynamic per token, or none; `ignore` lists modules
//!   left in bf16 by name or `re:` pattern.
//! - fbgemm (`quant_method: "fbgemm_fp8"`): row-wise weight scales, `activation_scale_ub`,
//!   `modules_to_not_convert` matched as transformers does (by substring).
//!
//! Anything else is refused, naming the field, rather than loaded as something it is not.

use std::path::Path;

use serde_json::{Map, Value};

use super::{ActivationScheme, ModulePattern, QuantMethod, Quantization, ScaleStrategy};
use crate::error::{Error, Result};

/// The field prefix of every error.
const FIELD: &str = "quantization_config";

/// Parses `quantization_config` (absent or `null`: no quantization); `file` names config.json.
pub fn parse(value: Option<&Value>, file: &Path) -> Result<Option<Quantization>> {
    let obj = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(other) => return Err(Error::config(file, FIELD, format!("expected an object, found {other}"))),
    };
    let err = |field: &str, message: String| Error::config(file, format!("{FIELD}.{field}"), message);
    // A checkpoint that quantizes only its KV cache (a `kv_cache_scheme`, no weight groups, as
    // llm-compressor writes one) has unquantized weights; the scheme is `super::kv`'s.
    let kv_only = obj.get("kv_cache_scheme").is_some_and(|v| !v.is_null())
        && obj.get("config_groups").and_then(Value::as_object).is_none_or(|g| g.is_empty());
    if kv_only {
        return Ok(None);
    }
    let method =
        obj.get("quant_method").and_then(Value::as_str).ok_or_else(|| err("quant_method", "missing".into()))?;
    let (method, keep) = match method {
        "compressed-tensors" => compressed_tensors(obj, &err)?,
        "fbgemm_fp8" => fbgemm(obj, &err)?,
        other => {
            return Err(err(
                "quant_method",
                format!("`{other}` is not supported (FP8: compressed-tensors float-quantized, fbgemm_fp8)"),
            ))
        }
    };
    Ok(Some(Quantization { method, keep, raw: Some(Value::Object(obj.clone())) }))
}

type ErrFn<'a> = dyn Fn(&str, String) -> Error + 'a;

fn compressed_tensors(obj: &Map<String, Value>, err: &ErrFn) -> Result<(QuantMethod, Vec<ModulePattern>)> {
    match obj.get("format").and_then(Value::as_str) {
        Some("float-quantized") => {}
        Some(other) => return Err(err("format", format!("`{other}` is not supported (float-quantized)"))),
        None => return Err(err("format", "missing (float-quantized)".into())),
    }
    // `kv_cache_scheme` is the KV cache's, read by `super::kv::checkpoint_dtype`.
    let groups = obj
        .get("config_groups")
        .and_then(Value::as_object)
        .filter(|g| !g.is_empty())
        .ok_or_else(|| err("config_groups", "missing or empty".into()))?;
    let mut found = None;
    for (name, group) in groups {
        let at = |f: &str| format!("config_groups.{name}.{f}");
        let weights = group.get("weights").ok_or_else(|| err(&at("weights"), "missing".into()))?;
        let w = float8_scheme(weights, &at("weights"), err)?;
        let weights = match (w.strategy, w.dynamic) {
            ("tensor", false) => ScaleStrategy::Tensor,
            ("channel", false) => ScaleStrategy::Channel,
            (s, d) => {
                return Err(err(
                    &at("weights.strategy"),
                    format!("`{s}` (dynamic: {d}) weight scales are not supported (static tensor or channel)"),
                ))
            }
        };
        let activations = match group.get("input_activations").filter(|v| !v.is_null()) {
            None => ActivationScheme::None,
            Some(a) => match float8_scheme(a, &at("input_activations"), err)? {
                Float8Scheme { strategy: "tensor", dynamic: false } => ActivationScheme::StaticTensor,
                Float8Scheme { strategy: "token", dynamic: true } => ActivationScheme::DynamicToken,
                Float8Scheme { strategy, dynamic } => {
                    return Err(err(
                        &at("input_activations.strategy"),
                        format!("`{strategy}` (dynamic: {dynamic}) is not supported (static tensor or dynamic token)"),
                    ))
                }
            },
        };
        let this = QuantMethod::CompressedTensors { weights, activations };
        match &found {
            Some(first) if *first != this => {
                return Err(err("config_groups", "groups with different schemes are not supported".into()))
            }
            _ => found = Some(this),
        }
    }
    let method = found.ok_or_else(|| err("config_groups", "empty".into()))?;
    let keep = string_list(obj, "ignore", err)?
        .into_iter()
        .map(|s| match s.strip_prefix("re:") {
            Some(pattern) => regex::Regex::new(pattern)
                .map(ModulePattern::Regex)
                .map_err(|e| err("ignore", format!("`{s}` is not a valid pattern: {e}"))),
            None => Ok(ModulePattern::Exact(s)),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((method, keep))
}

/// The parts of a compressed-tensors quantization scheme tulu depends on, checked to be 8-bit
/// float, symmetric and without groups or blocks.
struct Float8Scheme<'a> {
    strategy: &'a str,
    dynamic: bool,
}

fn float8_scheme<'a>(v: &'a Value, at: &str, err: &ErrFn) -> Result<Float8Scheme<'a>> {
    let field = |f: &str| format!("{at}.{f}");
    let o = v.as_object().ok_or_else(|| err(at, format!("expected an object, found {v}")))?;
    if o.get("type").and_then(Value::as_str) != Some("float") || o.get("num_bits").and_then(Value::as_u64) != Some(8) {
        return Err(err(at, "only 8-bit float (e4m3) is supported (`type: float`, `num_bits: 8`)".into()));
    }
    if o.get("symmetric").and_then(Value::as_bool) == Some(false) {
        return Err(err(&field("symmetric"), "asymmetric FP8 is not supported".into()));
    }
    for f in ["group_size", "block_structure"] {
        if o.get(f).is_some_and(|x| !x.is_null()) {
            return Err(err(&field(f), "group- and block-wise scales are not supported".into()));
        }
    }
    let strategy =
        o.get("strategy").and_then(Value::as_str).ok_or_else(|| err(&field("strategy"), "missing".into()))?;
    let dynamic = match o.get("dynamic") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(err(&field("dynamic"), format!("expected true or false, found {other}"))),
    };
    Ok(Float8Scheme { strategy, dynamic })
}

fn fbgemm(obj: &Map<String, Value>, err: &ErrFn) -> Result<(QuantMethod, Vec<ModulePattern>)> {
    let ub = match obj.get("activation_scale_ub") {
        None | Some(Value::Null) => 1200.0,
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| err("activation_scale_ub", format!("expected a positive number, found {v}")))?,
    };
    let keep = string_list(obj, "modules_to_not_convert", err)?.into_iter().map(ModulePattern::Contains).collect();
    Ok((QuantMethod::Fbgemm { activation_scale_ub: ub }, keep))
}

fn string_list(obj: &Map<String, Value>, field: &str, err: &ErrFn) -> Result<Vec<String>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| err(field, format!("expected strings, found {v}"))))
            .collect(),
        Some(other) => Err(err(field, format!("expected a list of module names, found {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_ok(v: Value) -> Quantization {
        parse(Some(&v), Path::new("config.json")).unwrap().unwrap()
    }

    fn field_of(v: Value) -> String {
        match parse(Some(&v), Path::new("config.json")) {
            Err(Error::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    fn ct(weights: Value, acts: Value) -> Value {
        json!({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*layers\\.3\\..*"],
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}})
    }

    fn scheme(strategy: &str, dynamic: bool) -> Value {
        json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": strategy, "dynamic": dynamic,
               "group_size": null, "block_structure": null})
    }

    #[test]
    fn published_layouts_parse() {
        let q = parse_ok(ct(scheme("tensor", false), scheme("tensor", false)));
        let expect = QuantMethod::CompressedTensors {
            weights: ScaleStrategy::Tensor,
            activations: ActivationScheme::StaticTensor,
        };
        assert_eq!(q.method, expect);
        assert!(q.keeps("lm_head") && q.keeps("model.layers.3.mlp.up_proj") && !q.keeps("model.layers.13.mlp.up_proj"));
        let q = parse_ok(ct(scheme("channel", false), scheme("token", true)));
        let expect = QuantMethod::CompressedTensors {
            weights: ScaleStrategy::Channel,
            activations: ActivationScheme::DynamicToken,
        };
        assert_eq!(q.method, expect);
        let q = parse_ok(json!({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                "modules_to_not_convert": ["model.layers.0.mlp", "self_attn", "lm_head"]}));
        assert_eq!(q.method, QuantMethod::Fbgemm { activation_scale_ub: 1200.0 });
        assert!(q.keeps("model.layers.7.self_attn.q_proj") && q.keeps("model.layers.0.mlp.down_proj"));
        assert!(!q.keeps("model.layers.1.mlp.down_proj"));
    }

    #[test]
    fn unknown_methods_and_schemes_name_their_field() {
        assert_eq!(field_of(json!({"quant_method": "awq"})), "quantization_config.quant_method");
        assert_eq!(field_of(json!({"bits": 4})), "quantization_config.quant_method");
        let mut v = ct(scheme("tensor", false), Value::Null);
        v["format"] = json!("pack-quantized");
        assert_eq!(field_of(v), "quantization_config.format");
        assert_eq!(
            field_of(ct(scheme("group", false), Value::Null)),
            "quantization_config.config_groups.group_0.weights.strategy"
        );
        let int8 = json!({"num_bits": 8, "type": "int", "strategy": "channel"});
        assert_eq!(field_of(ct(int8, Value::Null)), "quantization_config.config_groups.group_0.weights");
        assert_eq!(
            field_of(ct(scheme("channel", false), scheme("token", false))),
            "quantization_config.config_groups.group_0.input_activations.strategy"
        );
        let mut v = ct(scheme("tensor", false), Value::Null);
        v["ignore"] = json!(["re:(unclosed"]);
        assert_eq!(field_of(v), "quantization_config.ignore");
        let ub = json!({"quant_method": "fbgemm_fp8", "activation_scale_ub": -1});
        assert_eq!(field_of(ub), "quantization_config.activation_scale_ub");
    }
}
