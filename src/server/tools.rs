//! Tool calls on `/v1/chat/completions`: `tools` and `tool_choice` (`none`, `auto`, `required`,
//! or a named function). The tools reach the model through its chat template (Llama 3.1's asks
//! for `{"name": ..., "parameters": {...}}`); with `required` or a named function the answer is
//! constrained to that shape and to each function's parameter schema, and an answer of that
//! shape becomes `tool_calls` with `finish_reason: "tool_calls"`. With `auto` and a function
//! marked `strict: true`, the answer stays free unless it opens a call (`{` or
//! `<|python_tag|>`); from there the calls are constrained ([`crate::grammar::ToolCalls`]).

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::structured::RequestConstraint;
use crate::grammar::{Constraint, ToolCalls};

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The model must not call a tool (the tools are not shown to it).
    None,
    /// The model may answer or call a tool.
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this function.
    Named(String),
}

/// A request's tools.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// `tools` as given, for the chat template.
    pub list: Value,
    /// Each function's name and parameter schema.
    pub functions: Vec<(String, Value)>,
    /// `tool_choice`.
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): whether one answer may hold several calls.
    pub parallel: bool,
    /// Whether each function (in the order of `functions`) is `strict`.
    pub strict: Vec<bool>,
}

impl Tools {
    /// Whether the answer may be a tool call (the tools are shown to the model).
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The constraint `required` or a named function puts on the answer: a call object of one
    /// of the allowed functions, its parameters valid under the function's schema. With `auto`
    /// and a strict function: free text, or calls whose strict functions' parameters are
    /// valid (a function that is not strict takes any object).
    pub fn constraint(&self) -> Option<RequestConstraint> {
        let allowed: Vec<&(String, Value)> = match &self.choice {
            ToolChoice::None => return None,
            ToolChoice::Auto if !self.strict.contains(&true) => return None,
            ToolChoice::Auto => {
                let functions = self
                    .functions
                    .iter()
                    .zip(&self.strict)
                    .map(|((name, params), &strict)| (name.clone(), strict.then(|| params.clone())))
                    .collect();
                let calls = ToolCalls { functions, parallel: self.parallel };
                return Some(RequestConstraint { constraint: Constraint::ToolCalls(calls), param: "tools".into() });
            }
            ToolChoice::Required => self.functions.iter().collect(),
            ToolChoice::Named(name) => self.functions.iter().filter(|(n, _)| n == name).collect(),
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|(name, params)| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, "parameters": params},
                    "required": ["name", "parameters"],
                    "additionalProperties": false
                })
            })
            .collect();
        let schema = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
        Some(RequestConstraint { constraint: Constraint::JsonSchema(schema), param: "tools".into() })
    }

    /// The error of a request whose tools constrain the answer (see [`Tools::constraint`]) and
    /// that also sets the output constraint `other` (a parameter name): the tool field named.
    pub fn conflict(&self, other: &str) -> ApiError {
        match self.strict.iter().position(|&s| s).filter(|_| self.choice == ToolChoice::Auto) {
            Some(i) => ApiError::param(
                &format!("tools[{i}].function.strict"),
                format!("cannot be combined with `{other}` under `tool_choice: \"auto\"`: a request takes one output constraint"),
            ),
            None => ApiError::param(
                "tool_choice",
                format!("`required` or a named function cannot be combined with `{other}`"),
            ),
        }
    }

    /// The tool call `text` is, if it is one: a JSON object naming one of the functions, with
    /// its arguments under `parameters` (Llama 3.1) or `arguments`; returns the name and the
    /// arguments as OpenAI sends them (a JSON string).
    pub fn parse_call(&self, text: &str) -> Option<(String, String)> {
        let v: Value = serde_json::from_str(text.trim()).ok()?;
        self.call_of(&v)
    }

    /// The tool calls `text` starts with, in Llama 3.1's forms: after an optional
    /// `<|python_tag|>`, one or more call objects of offered functions separated by whitespace
    /// or `;`; and the text the model wrote after them (trimmed, often empty). `None` unless the
    /// text starts with a call (then it is an answer). Without `parallel_tool_calls`, only the
    /// first call is kept.
    pub fn parse_calls(&self, text: &str) -> Option<(Vec<(String, String)>, String)> {
        let text = text.trim();
        let mut rest = text.strip_prefix("<|python_tag|>").unwrap_or(text).trim_start();
        let mut calls = Vec::new();
        while !rest.is_empty() {
            let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            let Some(call) = values.next().and_then(|v| v.ok()).and_then(|v| self.call_of(&v)) else { break };
            calls.push(call);
            let after = rest[values.byte_offset()..].trim_start();
            rest = after.strip_prefix(';').unwrap_or(after).trim_start();
        }
        if !self.parallel {
            calls.truncate(1);
        }
        (!calls.is_empty()).then(|| (calls, rest.to_owned()))
    }

    fn call_of(&self, v: &Value) -> Option<(String, String)> {
        let name = v.get("name")?.as_str()?;
        if !self.functions.iter().any(|(n, _)| n == name) {
            return None;
        }
        let args = v.get("parameters").or_else(|| v.get("arguments")).filter(|a| a.is_object())?;
        Some((name.to_owned(), args.to_string()))
    }
}

/// The `tool_calls` entry of one call, with a fresh id.
pub fn call_json(name: &str, arguments: &str) -> Value {
    json!({
        "id": format!("chatcmpl-tool-{:032x}", rand::random::<u128>()),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    })
}

/// Reads `tools` and `tool_choice`; `None` when no tools are given (an empty list included).
pub fn parse(obj: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let list = match obj.get("tools") {
        None | Some(Value::Null) => return no_tools(obj),
        Some(Value::Array(items)) if items.is_empty() => return no_tools(obj),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::param("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}"))
        }
    };
    let mut functions = Vec::with_capacity(list.len());
    let mut strict = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::param(&at(".type"), "must be \"function\""));
        }
        let Some(Value::Object(f)) = tool.get("function") else {
            return Err(ApiError::param(&at(".function"), "is required (an object with `name`)"));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => return Err(ApiError::param(&at(".function.name"), "must be a non-empty string")),
        };
        if functions.iter().any(|(n, _)| *n == name) {
            return Err(ApiError::param(&at(".function.name"), format!("`{name}` is given twice")));
        }
        let params = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(ApiError::param(&at(".function.parameters"), "must be a JSON schema object")),
        };
        strict.push(match f.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::param(&at(".function.strict"), "must be a boolean")),
        });
        functions.push((name, params));
    }
    let choice = tool_choice(obj.get("tool_choice"), &functions)?;
    let parallel = match obj.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::param("parallel_tool_calls", "must be a boolean")),
    };
    Ok(Some(Tools { list: Value::Array(list.clone()), functions, choice, parallel, strict }))
}

fn no_tools(obj: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    match obj.get("tool_choice") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
        Some(_) => Err(ApiError::param("tool_choice", "needs `tools`")),
    }
}

fn tool_choice(v: Option<&Value>, functions: &[(String, Value)]) -> Result<ToolChoice, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            _ => Err(ApiError::param("tool_choice", "must be \"none\", \"auto\", \"required\" or a named function")),
        },
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match name {
                Some(n) if functions.iter().any(|(f, _)| f == n) => Ok(ToolChoice::Named(n.to_owned())),
                Some(n) => Err(ApiError::param("tool_choice.function.name", format!("`{n}` is not one of `tools`"))),
                None => Err(ApiError::param("tool_choice.function.name", "is required")),
            }
        }
        Some(_) => Err(ApiError::param("tool_choice", "must be a string or {\"type\": \"function\", ...}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: Value) -> Result<Option<Tools>, ApiError> {
        parse(body.as_object().expect("object"))
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn choices_constraints_and_calls() {
        let t = parsed(json!({"tools": weather()})).expect("ok").expect("tools");
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.constraint().is_none() && t.active());
        let t = parsed(json!({"tools": weather(), "tool_choice": "required"})).expect("ok").expect("tools");
        let c = t.constraint().expect("constrained");
        assert_eq!(c.param, "tools");
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = parsed(json!({"tools": weather(), "tool_choice": named})).expect("ok").expect("tools");
        assert_eq!(t.choice, ToolChoice::Named("get_weather".into()));
        assert_eq!(
            t.parse_call(r#" {"name": "get_weather", "parameters": {"city": "Paris"}} "#),
            Some(("get_weather".into(), r#"{"city":"Paris"}"#.into()))
        );
        assert_eq!(t.parse_call(r#"{"name": "other", "parameters": {}}"#), None);
        assert_eq!(t.parse_call("Paris is sunny."), None);
        // Llama 3.1's forms: python_tag, several calls separated by `;` or whitespace.
        let paris = ("get_weather".to_owned(), r#"{"city":"Paris"}"#.to_owned());
        let lyon = ("get_weather".to_owned(), r#"{"city":"Lyon"}"#.to_owned());
        let calls = |text: &str| t.parse_calls(text);
        let two = r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "arguments": {"city": "Lyon"}}"#;
        assert_eq!(calls(two), Some((vec![paris.clone(), lyon.clone()], String::new())));
        let newline = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Lyon\"}}";
        assert_eq!(calls(newline), Some((vec![paris.clone(), lyon], String::new())));
        // Text after the calls is kept beside them, as streaming sends it.
        let more = r#"{"name": "get_weather", "parameters": {"city": "Paris"}} and more"#;
        assert_eq!(calls(more), Some((vec![paris.clone()], "and more".into())));
        let nope = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "nope", "parameters": {}}"#;
        assert_eq!(calls(nope), Some((vec![paris.clone()], r#"{"name": "nope", "parameters": {}}"#.into())));
        assert_eq!(calls(r#"Sure: {"name": "get_weather", "parameters": {}}"#), None);
        assert_eq!(calls("   "), None);
        let single = parsed(json!({"tools": weather(), "parallel_tool_calls": false})).expect("ok").expect("tools");
        assert_eq!(single.parse_calls(two), Some((vec![paris], String::new())));
        assert!(!parsed(json!({"tools": weather(), "tool_choice": "none"})).expect("ok").expect("tools").active());
        assert_eq!(parsed(json!({"tools": []})).expect("ok"), None);
        // `auto` with a strict function: free text or calls, the strict one's parameters held
        // to its schema, the other's to any object.
        let mut two = weather();
        two[0]["function"]["strict"] = json!(true);
        two.as_array_mut().expect("list").push(json!({"type": "function", "function": {"name": "other"}}));
        let t = parsed(json!({"tools": two, "parallel_tool_calls": false})).expect("ok").expect("tools");
        let want = ToolCalls {
            functions: vec![
                ("get_weather".into(), Some(weather()[0]["function"]["parameters"].clone())),
                ("other".into(), None),
            ],
            parallel: false,
        };
        assert_eq!(
            t.constraint().map(|c| (c.constraint, c.param)),
            Some((Constraint::ToolCalls(want), "tools".into()))
        );
        assert_eq!(t.conflict("guided_regex").param.as_deref(), Some("tools[0].function.strict"));
    }

    #[test]
    fn malformed_tools_are_named() {
        let cases = [
            (json!({"tools": 3}), "tools"),
            (json!({"tools": [{"type": "function"}]}), "tools[0].function"),
            (json!({"tools": [{"type": "function", "function": {"name": ""}}]}), "tools[0].function.name"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (json!({"tools": weather(), "tool_choice": "sometimes"}), "tool_choice"),
            (
                json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice.function.name",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": weather(), "parallel_tool_calls": "yes"}), "parallel_tool_calls"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "strict": 1}}]}),
                "tools[0].function.strict",
            ),
        ];
        for (body, param) in cases {
            match parsed(body.clone()) {
                Err(e) => assert_eq!(e.param.as_deref(), Some(param), "{body}"),
                Ok(t) => panic!("{body}: {t:?}"),
            }
        }
    }
}
