//! `gossamer config ...`: the operator's side of configuration documents.
//!
//! `apply` reads documents from files, checks them as every agent will,
//! asks the agent for the live version of each, signs the next version with
//! the operator's key and submits it, printing what changed.

use anyhow::Context;
use gossamer_transport::sign::OperatorSigner;
use http::{Method, StatusCode};
use serde_json::Value;

use super::envelope::{Envelope, EnvelopeJson, parse_file};
use crate::cli::{AdminArgs, ConfigCommand, SignerArgs};
use crate::client::{self, ClientError};
use crate::config::AdminToken;

fn token(admin: &AdminArgs) -> anyhow::Result<Option<AdminToken>> {
    admin
        .admin_token_file
        .as_deref()
        .map(AdminToken::load)
        .transpose()
        .map_err(anyhow::Error::msg)
}

fn signer(args: &SignerArgs) -> anyhow::Result<OperatorSigner> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    OperatorSigner::from_pem(&read(&args.operator_cert)?, &read(&args.operator_key)?)
        .with_context(|| format!("{}", args.operator_cert.display()))
}

/// The live document, if any: (version, body, deleted).
async fn live(
    admin: &AdminArgs,
    kind: &str,
    name: &str,
) -> anyhow::Result<Option<(u64, Value, bool)>> {
    let path = format!("/v1/config/{kind}/{name}");
    match client::call(admin.admin, None, Method::GET, &path, None).await {
        Ok(body) => {
            let row: Value = serde_json::from_slice(&body).context("bad answer from the agent")?;
            let version = row["version"].as_u64().context("bad answer: no version")?;
            let env: EnvelopeJson = serde_json::from_value(row["envelope"].clone())
                .context("bad answer: no envelope")?;
            Ok(Some((version, env.body, env.deleted)))
        }
        Err(ClientError::Status { status, .. }) if status == StatusCode::NOT_FOUND => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn submit(admin: &AdminArgs, env: &Envelope) -> anyhow::Result<Value> {
    let body = serde_json::to_vec(&env.to_json()).expect("serializable");
    let answer = client::call(
        admin.admin,
        token(admin)?.as_ref(),
        Method::POST,
        "/v1/config",
        Some(body),
    )
    .await?;
    serde_json::from_slice(&answer).context("bad answer from the agent")
}

/// Runs one `gossamer config` subcommand.
pub async fn run(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Apply {
            files,
            signer: signer_args,
            admin,
            dry_run,
        } => {
            let signer = signer(&signer_args)?;
            // Every file is read and every document checked before any is
            // submitted: a mistake in the third changes nothing.
            let mut docs = Vec::new();
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let label = file.display().to_string();
                for (kind, name, body) in parse_file(&label, &text).map_err(anyhow::Error::msg)? {
                    Envelope::new(&kind, &name, 1, Some(&body)).with_context(|| label.clone())?;
                    docs.push((kind, name, body));
                }
            }
            if docs.is_empty() {
                anyhow::bail!("no documents in {}", files.len());
            }
            for (kind, name, body) in docs {
                let live = live(&admin, &kind, &name).await?;
                let version = live.as_ref().map_or(0, |l| l.0) + 1;
                let old = live.as_ref().filter(|l| !l.2).map(|l| &l.1);
                if old == Some(&body) {
                    println!("{kind} {name}: unchanged (version {})", version - 1);
                    continue;
                }
                let mut env = Envelope::new(&kind, &name, version, Some(&body))?;
                env.sign(&signer)?;
                print!("{}", diff(old, Some(&body)));
                if dry_run {
                    println!("{kind} {name}: would be version {version} (dry run: nothing sent)");
                    continue;
                }
                let answer = submit(&admin, &env).await?;
                println!(
                    "{kind} {name}: version {} applied, signed by {} (digest {})",
                    answer["version"],
                    signer.name(),
                    answer["digest"]
                        .as_str()
                        .unwrap_or("?")
                        .get(..16)
                        .unwrap_or("?"),
                );
            }
            Ok(())
        }
        ConfigCommand::Delete {
            kind,
            name,
            signer: signer_args,
            admin,
        } => {
            let signer = signer(&signer_args)?;
            let Some((live_version, body, deleted)) = live(&admin, &kind, &name).await? else {
                anyhow::bail!("no document {kind} {name}");
            };
            if deleted {
                println!("{kind} {name}: already deleted (version {live_version})");
                return Ok(());
            }
            let mut env = Envelope::new(&kind, &name, live_version + 1, None)?;
            env.sign(&signer)?;
            print!("{}", diff(Some(&body), None));
            let answer = submit(&admin, &env).await?;
            println!(
                "{kind} {name}: deleted (tombstone version {})",
                answer["version"]
            );
            Ok(())
        }
        ConfigCommand::Get {
            kind,
            name,
            admin,
            json,
        } => {
            let path = format!("/v1/config/{kind}/{name}");
            let body = client::call(admin.admin, None, Method::GET, &path, None).await?;
            if json {
                print!("{}", String::from_utf8_lossy(&body));
                return Ok(());
            }
            let row: Value = serde_json::from_slice(&body).context("bad answer")?;
            println!(
                "{kind} {name}: version {} ({}), signed by {}, digest {}",
                row["version"],
                row["status"].as_str().unwrap_or("?"),
                row["signer"].as_str().unwrap_or("?"),
                row["digest"].as_str().unwrap_or("?")
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&row["envelope"]["body"]).unwrap_or_default()
            );
            Ok(())
        }
        ConfigCommand::List { admin, kind, json } => {
            let path = match &kind {
                Some(k) => format!("/v1/config?kind={k}"),
                None => "/v1/config".to_owned(),
            };
            let body = client::call(admin.admin, None, Method::GET, &path, None).await?;
            if json {
                print!("{}", String::from_utf8_lossy(&body));
                return Ok(());
            }
            let answer: Value = serde_json::from_slice(&body).context("bad answer")?;
            let empty = Vec::new();
            let docs = answer["documents"].as_array().unwrap_or(&empty);
            if docs.is_empty() {
                println!("no configuration documents");
            } else {
                println!(
                    "{:<10} {:<32} {:>8} {:<8} {:<16} {:<16}",
                    "KIND", "NAME", "VERSION", "STATUS", "SIGNER", "DIGEST"
                );
                for d in docs {
                    println!(
                        "{:<10} {:<32} {:>8} {:<8} {:<16} {:<16}",
                        d["kind"].as_str().unwrap_or("?"),
                        d["name"].as_str().unwrap_or("?"),
                        d["version"],
                        d["status"].as_str().unwrap_or("?"),
                        d["signer"].as_str().unwrap_or("?"),
                        d["digest"].as_str().unwrap_or("?").get(..16).unwrap_or("?"),
                    );
                }
            }
            let refused = answer["refused"].as_array().unwrap_or(&empty);
            if !refused.is_empty() {
                println!("\nrecently refused:");
                for r in refused {
                    println!("  {}", r["error"].as_str().unwrap_or("?"));
                }
            }
            Ok(())
        }
    }
}

/// A line diff of two bodies as pretty JSON (`-` removed, `+` added).
pub fn diff(old: Option<&Value>, new: Option<&Value>) -> String {
    let lines = |v: Option<&Value>| -> Vec<String> {
        v.map(|v| {
            serde_json::to_string_pretty(v)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
    };
    let (a, b) = (lines(old), lines(new));
    // Longest common subsequence, then walk it.
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_changed_lines() {
        let old = serde_json::json!({"sticky": "path", "timeout": "1s"});
        let new = serde_json::json!({"sticky": "path", "timeout": "2s"});
        let d = diff(Some(&old), Some(&new));
        assert!(d.contains("-   \"timeout\": \"1s\""), "{d}");
        assert!(d.contains("+   \"timeout\": \"2s\""), "{d}");
        assert!(d.contains("    \"sticky\": \"path\","), "{d}");
        assert!(diff(None, Some(&new)).lines().all(|l| l.starts_with('+')));
    }
}
