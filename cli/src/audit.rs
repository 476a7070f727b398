//! `hotswapctl audit`: the tamper-evident log of every mutating call.

use clap::Subcommand;
use comfy_table::Cell;
use hotswap_common::pb;
use serde::Serialize;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Audit records, oldest first (the newest --limit of those matching).
    #[command(
        after_help = "Examples:\n  hotswapctl audit list\n  hotswapctl audit list --user alice --action deploy. --limit 20\n  hotswapctl audit list --result denied\n  hotswapctl -o json audit list --since 100"
    )]
    List {
        /// Only records with this sequence number or later.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        user: Option<String>,
        /// An action (deploy.create) or a prefix ending in '.' (deploy.).
        #[arg(long)]
        action: Option<String>,
        /// ok, denied, rate_limited or error.
        #[arg(long)]
        result: Option<String>,
    },
    /// Check the hash chain; exits 1 and names the first broken record if
    /// the log was altered.
    #[command(
        after_help = "Examples:\n  hotswapctl audit verify\n  hotswapctl -o json audit verify"
    )]
    Verify,
}

pub(crate) use hotswap_common::model::AuditRecordView as RecordView;

#[derive(Serialize)]
struct VerifyView {
    intact: bool,
    records: u64,
    head_hash: String,
    broken_seq: Option<u64>,
    problem: Option<String>,
    /// 1, or the first record kept after `audit_retention` removed older ones.
    first_seq: u64,
    /// The CA that signed the retention anchor of a trimmed chain.
    anchor_signer: Option<String>,
}

pub async fn run(ctx: &Context, command: AuditCommand) -> Result<(), CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::audit_client::AuditClient::new(conn.channel.clone());
    match command {
        AuditCommand::List {
            since,
            limit,
            user,
            action,
            result,
        } => {
            let records = client
                .list_audit(pb::ListAuditRequest {
                    since,
                    limit,
                    user: user.unwrap_or_default(),
                    action: action.unwrap_or_default(),
                    result: result.unwrap_or_default(),
                })
                .await
                .map_err(conn.rpc_error("list audit records"))?
                .into_inner()
                .records;
            let views: Vec<RecordView> = records.into_iter().map(RecordView::from).collect();
            match ctx.output {
                OutputFormat::Json => output::print_json(&views),
                OutputFormat::Table => {
                    let mut table =
                        output::table(&["SEQ", "TIME", "USER", "ACTION", "TARGET", "RESULT"]);
                    for r in views {
                        // Date and seconds fit 80 columns; JSON has the full time.
                        let time = r.time.unwrap_or_default();
                        table.add_row(vec![
                            Cell::new(r.seq),
                            Cell::new(time.get(..19).unwrap_or(&time).replace('T', " ")),
                            Cell::new(r.user),
                            Cell::new(r.action),
                            Cell::new(r.target),
                            output::status_cell(&r.result),
                        ]);
                    }
                    output::print_table(&table);
                }
            }
            Ok(())
        }
        AuditCommand::Verify => {
            let v = client
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(conn.rpc_error("verify the audit log"))?
                .into_inner();
            let view = VerifyView {
                intact: v.intact,
                records: v.records,
                head_hash: v.head_hash.clone(),
                broken_seq: (!v.intact).then_some(v.broken_seq),
                problem: (!v.intact).then(|| v.problem.clone()),
                first_seq: v.first_seq.max(1),
                anchor_signer: (!v.anchor_signer.is_empty()).then(|| v.anchor_signer.clone()),
            };
            match ctx.output {
                OutputFormat::Json => output::print_json(&view),
                OutputFormat::Table if v.intact && v.first_seq > 1 => println!(
                    "audit log intact: {} records from record {} (older ones removed by \
                     audit_retention; the anchor is signed by CA {}), head {}",
                    v.records, v.first_seq, v.anchor_signer, v.head_hash
                ),
                OutputFormat::Table if v.intact => println!(
                    "audit log intact: {} records, head {}",
                    v.records, v.head_hash
                ),
                OutputFormat::Table => {}
            }
            if v.intact {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "audit log broken at record {}: {} ({} records before it verify)",
                    v.broken_seq,
                    v.problem,
                    v.records
                )
                .into())
            }
        }
    }
}
