//! Reading a JSON request body's fields with their types checked, so that every API's parser
//! names the field at fault and what it expected.

use serde_json::{Map, Value};

use super::error::ApiError;

/// A JSON object's fields, read with types checked and `null` treated as absent.
pub(crate) struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub(crate) fn require(&self, name: &str) -> Result<&Value, ApiError> {
        self.get(name).ok_or_else(|| ApiError::param(name, "is required"))
    }

    pub(crate) fn float(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(x)) => x
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| ApiError::param(name, "must be a finite number")),
            Some(v) => Err(ApiError::param(name, format!("must be a number, got {}", kind(v)))),
        }
    }

    pub(crate) fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(x)) if x.is_i64() => Ok(x.as_i64()),
            // Beyond i64: as good as infinite for every integer option here.
            Some(Value::Number(x)) if x.is_u64() => Ok(Some(i64::MAX)),
            Some(v) => Err(ApiError::param(name, format!("must be an integer, got {}", kind(v)))),
        }
    }

    pub(crate) fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.bool_named(name, name)
    }

    pub(crate) fn bool_named(&self, name: &str, param: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::param(param, format!("must be a boolean, got {}", kind(v)))),
        }
    }

    pub(crate) fn string(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::param(name, format!("must be a string, got {}", kind(v)))),
        }
    }
}

/// A JSON value's type, as error messages name it.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
