//! Client tools on `/v1/messages`: Anthropic's `tools` (`{"name", "description",
//! "input_schema"}`) and `tool_choice` (`auto`, `any`, `tool` + `name`, `none`;
//! `disable_parallel_tool_use`) are read into the chat path's [`Tools`]; an answer that is calls
//! of them becomes `tool_use` content blocks with `stop_reason: "tool_use"`. Server tools
//! (`web_search_...`, anything with another `type`) are refused naming the field.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::fields::kind;
use super::tools::{self, Tools};

/// Reads Anthropic's `tools` and `tool_choice` from `obj`; `None` without tools.
pub fn parse(obj: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let mut chat = Map::new();
    match obj.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            let list = items.iter().enumerate().map(|(i, t)| chat_tool(t, i)).collect::<Result<Vec<_>, _>>()?;
            chat.insert("tools".into(), Value::Array(list));
        }
        Some(v) => return Err(ApiError::param("tools", format!("must be a list of tools, got {}", kind(v)))),
    }
    match obj.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            let choice = match o.get("type").and_then(Value::as_str) {
                Some("auto") => json!("auto"),
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => {
                    json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}})
                }
                _ => {
                    return Err(ApiError::param("tool_choice.type", "must be \"auto\", \"any\", \"tool\" or \"none\""))
                }
            };
            chat.insert("tool_choice".into(), choice);
            match o.get("disable_parallel_tool_use") {
                None | Some(Value::Null) => {}
                Some(Value::Bool(b)) => {
                    chat.insert("parallel_tool_calls".into(), json!(!b));
                }
                Some(_) => return Err(ApiError::param("tool_choice.disable_parallel_tool_use", "must be a boolean")),
            }
        }
        Some(v) => return Err(ApiError::param("tool_choice", format!("must be an object, got {}", kind(v)))),
    }
    // The chat parser's field names, in this API's shape.
    tools::parse(&chat).map_err(|mut e| {
        e.param = e.param.map(|p| {
            p.replace(".function.parameters", ".input_schema").replace(".function.", ".").replace(".function", "")
        });
        e
    })
}

/// One Anthropic tool in chat's shape; errors name `tools[i].<field>`.
fn chat_tool(tool: &Value, i: usize) -> Result<Value, ApiError> {
    let Value::Object(t) = tool else {
        return Err(ApiError::param(&format!("tools[{i}]"), format!("must be an object, got {}", kind(tool))));
    };
    match t.get("type").and_then(Value::as_str) {
        None | Some("custom") => {}
        Some(other) => {
            return Err(ApiError::param(&format!("tools[{i}].type"), format!("`{other}` tools are not supported")))
        }
    }
    let mut function = Map::new();
    for (from, to) in
        [("name", "name"), ("description", "description"), ("input_schema", "parameters"), ("strict", "strict")]
    {
        if let Some(v) = t.get(from) {
            function.insert(to.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

/// The `tool_use` content block of one call (`arguments`: the call's JSON object as text).
pub fn tool_use_block(name: &str, arguments: &str) -> Value {
    let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": tool_use_id(), "name": name, "input": input})
}

/// A fresh `tool_use` block id.
pub fn tool_use_id() -> String {
    format!("toolu_{:024x}", rand::random::<u128>() >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: Value) -> Result<Option<Tools>, ApiError> {
        parse(body.as_object().expect("object"))
    }

    #[test]
    fn reads_tools_and_names_bad_fields() {
        let weather = json!({"name": "get_weather", "input_schema": {"type": "object"}});
        let body = json!({"tools": [weather], "tool_choice": {"type": "any", "disable_parallel_tool_use": true}});
        let t = parsed(body).expect("ok").expect("tools");
        assert_eq!((t.choice.clone(), t.parallel), (tools::ToolChoice::Required, false));
        let t = parsed(json!({"tools": [weather], "tool_choice": {"type": "tool", "name": "get_weather"}}));
        assert_eq!(t.expect("ok").expect("tools").choice, tools::ToolChoice::Named("get_weather".into()));
        let cases = [
            (json!({"tools": {}}), "tools"),
            (json!({"tools": [{"type": "web_search_20250305", "name": "w"}]}), "tools[0].type"),
            (json!({"tools": [{"input_schema": {}}]}), "tools[0].name"),
            (json!({"tools": [{"name": "f", "input_schema": 1}]}), "tools[0].input_schema"),
            (json!({"tools": [weather], "tool_choice": {"type": "maybe"}}), "tool_choice.type"),
            (json!({"tools": [weather], "tool_choice": {"type": "tool", "name": "g"}}), "tool_choice.name"),
        ];
        for (body, param) in cases {
            match parsed(body.clone()) {
                Err(e) => assert_eq!(e.param.as_deref(), Some(param), "{body}"),
                Ok(t) => panic!("{body}: {t:?}"),
            }
        }
    }
}
