//! Config JSON as Python writes it.
//!
//! Python's `json` module writes non-finite floats as the bare tokens `NaN`, `Infinity` and
//! `-Infinity`, which are not JSON; diffusers' `DPMSolverMultistepScheduler`, for one, saves
//! `"lambda_min_clipped": -Infinity`. Every config file dnd reads goes through
//! [`from_config_str`], which rewrites those tokens (outside strings) before serde_json
//! parses the text:
//!
//! - `Infinity` / `-Infinity` become `±1.7976931348623157e308` (`f64::MAX`): an `f32`
//!   field reads them as `±inf`, an `f64` field as `±f64::MAX` (wrap it with
//!   [`non_finite`] to get `±inf`); a bound that large clips nothing, as infinity would;
//! - `NaN` becomes `null`: an `Option` field reads `None`, as if the key were absent.

use std::borrow::Cow;

use serde::de::DeserializeOwned;

/// What `Infinity` is rewritten to: the largest finite `f64`, which serde_json accepts.
const INFINITY: &str = "1.7976931348623157e308";
const NEG_INFINITY: &str = "-1.7976931348623157e308";

/// Parses a config file's text, accepting Python's `NaN`, `Infinity` and `-Infinity`.
pub fn from_config_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    serde_json::from_str(&python_tokens_to_json(text))
}

/// [`from_config_str`] for bytes (a file's contents); invalid UTF-8 is a parse error.
pub fn from_config_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => from_config_str(text),
        // serde_json reports where the invalid byte is.
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// Maps the `f64::MAX` that `Infinity` was rewritten to back to infinity, for `f64`
/// fields where the difference matters: `#[serde(deserialize_with = "non_finite")]`.
pub fn non_finite<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let x: f64 = serde::Deserialize::deserialize(d)?;
    Ok(if x.abs() == f64::MAX { x.signum() * f64::INFINITY } else { x })
}

/// Rewrites bare `NaN`, `Infinity` and `-Infinity` outside strings; returns the text
/// itself when it has none (nearly every file).
pub fn python_tokens_to_json(text: &str) -> Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 32);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    let mut changed = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some((token, replacement)) =
            [("NaN", "null"), ("Infinity", INFINITY), ("-Infinity", NEG_INFINITY)]
                .into_iter()
                .find(|(token, _)| rest.starts_with(token))
        {
            out.push_str(replacement);
            rest = &rest[token.len()..];
            changed = true;
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    if changed { Cow::Owned(out) } else { Cow::Borrowed(text) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What diffusers 0.3x writes for `DPMSolverMultistepScheduler` (abridged).
    const DPM_SOLVER: &str = r#"{
  "_class_name": "DPMSolverMultistepScheduler",
  "_diffusers_version": "0.31.0",
  "algorithm_type": "dpmsolver++",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "dynamic_thresholding_ratio": 0.995,
  "euler_at_final": false,
  "final_sigmas_type": "zero",
  "lambda_min_clipped": -Infinity,
  "lower_order_final": true,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": NaN,
  "solver_order": 2,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "variance_type": null,
  "note": "Infinity and NaN in a string, \"-Infinity\" escaped, stay as written"
}"#;

    #[derive(serde::Deserialize)]
    struct Scheduler {
        beta_end: f64,
        #[serde(deserialize_with = "non_finite")]
        lambda_min_clipped: f64,
        sample_max_value: Option<f64>,
        note: String,
    }

    #[test]
    fn python_non_finite_numbers_load() {
        let s: Scheduler = from_config_str(DPM_SOLVER).unwrap();
        assert_eq!(s.beta_end, 0.012);
        assert_eq!(s.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(s.sample_max_value, None);
        assert_eq!(s.note, "Infinity and NaN in a string, \"-Infinity\" escaped, stay as written");
        // Without the rewrite, serde_json refuses the file: the bug this module fixes.
        assert!(serde_json::from_str::<serde_json::Value>(DPM_SOLVER).is_err());
    }

    #[test]
    fn f32_fields_read_infinity_and_values_read_numbers() {
        #[derive(serde::Deserialize)]
        struct F {
            hi: f32,
            lo: f32,
        }
        let f: F = from_config_str(r#"{"hi": Infinity, "lo": -Infinity}"#).unwrap();
        assert_eq!((f.hi, f.lo), (f32::INFINITY, f32::NEG_INFINITY));
        let v: serde_json::Value =
            from_config_slice(br#"{"a": [NaN, Infinity], "b": "NaN"}"#).unwrap();
        assert_eq!(v["a"][0], serde_json::Value::Null);
        assert_eq!(v["a"][1].as_f64(), Some(f64::MAX));
        assert_eq!(v["b"], "NaN");
    }

    #[test]
    fn strings_and_plain_files_are_untouched() {
        let plain = r#"{"name": "Infinity War", "x": 1.5}"#;
        assert!(matches!(python_tokens_to_json(plain), Cow::Borrowed(_)));
        let tricky = r#"{"k\"NaN": "a \\", "v": NaN, "u": "é Infinity"}"#;
        assert_eq!(
            python_tokens_to_json(tricky),
            r#"{"k\"NaN": "a \\", "v": null, "u": "é Infinity"}"#
        );
        // A malformed file still fails, with serde_json's message.
        assert!(from_config_str::<serde_json::Value>(r#"{"x": Infinit}"#).is_err());
    }
}
