//! A plan whose output is a remote prefix (`s3://`, `gs://`, `az://`;
//! feature `remote`): each job writes its file in a private staging
//! directory, uploads it under its final name (a multipart upload, its
//! header part last, as every remote output), then uploads its completion
//! record under `.ckptkit-jobs/`. A job is done when its record names this
//! plan and the object's size and ETag are the record's. `finish` checks
//! every job that way, then uploads what `convert` writes besides the
//! weights (carried model files, side files, the index) and the output
//! record, last, and removes the records: readers see a complete output
//! once the index and record are there (README, "Remote inputs and
//! outputs").

use std::path::Path;

use super::{
    check_pins, job_error, locate, open_input, reopen, write_job, write_json, Job, JobOutcome,
    JobPlan, JobRecord, MAX_RECORD_LEN,
};
use crate::error::{Error, ErrorKind, Result};
use crate::io::atomic::AtomicDir;
use crate::io::remote::{Upload, JOBS_PREFIX};
use crate::migrate::{carry_model_files, update_config, write_model_tail, ConvertOptions};

/// Checks the output prefix as `convert` to it would (refused when it
/// holds objects, unless `overwrite` and a previous output's record lists
/// them all).
pub(super) fn check_output(url: &str, overwrite: bool) -> Result<()> {
    Upload::prepare(url, true, overwrite).map(drop)
}

fn record_name(shard: &str) -> String {
    format!("{JOBS_PREFIX}{shard}.done.json")
}

/// The record of job `k` if it names this plan's job and its object has the
/// size and ETag the record gives.
fn done(up: &Upload, id: &str, k: usize, job: &Job) -> Result<Option<JobRecord>> {
    let name = record_name(&job.shard);
    let Some(bytes) = up.read_small(&name, MAX_RECORD_LEN)? else {
        return Ok(None);
    };
    let r: JobRecord = serde_json::from_slice(&bytes).map_err(|e| {
        Error::json("reading a job record", e)
            .with_file(format!("{}/{name}", up.url().trim_end_matches('/')))
    })?;
    // a record of another plan of the same output is not this job's: the
    // job runs again and replaces both
    if r.plan != id || r.job != k || r.shard != job.shard || r.etag.is_none() {
        return Ok(None);
    }
    Ok(match up.stat(&job.shard)? {
        Some((size, etag)) if size == r.size && etag == r.etag => Some(r),
        _ => None,
    })
}

/// Runs job `k` (see the module's text).
pub(super) fn run_job(
    plan: &JobPlan,
    id: &str,
    k: usize,
    job: &Job,
    opts: &ConvertOptions,
) -> Result<JobOutcome> {
    let up = Upload::for_job(&plan.output)?;
    if let Some(record) = done(&up, id, k, job)? {
        return Ok(JobOutcome {
            record,
            already_done: true,
            lossy_layers: Vec::new(),
        });
    }
    let dir = up.path();
    std::fs::create_dir(dir).map_err(|e| Error::from(e).with_file(dir))?;
    let lossy_layers = write_job(plan, k, job, dir, opts)?;
    let fp = dir.join(&job.shard);
    let blake3 = crate::io::hash_file(&fp)?.to_hex().to_string();
    let (size, etag) = up.put_one(&fp, &job.shard, &opts.control)?;
    if etag.is_none() {
        return Err(Error::new(ErrorKind::Remote(format!(
            "{}: the store gives no ETag for `{}`; a plan's jobs are checked by it",
            plan.output, job.shard
        ))));
    }
    crate::io::atomic::fault_point("job-before-record");
    let record = JobRecord {
        plan: id.into(),
        job: k,
        shard: job.shard.clone(),
        size,
        blake3,
        etag,
    };
    let rp = up.path().with_extension("done.json");
    write_json(&record, &rp, true)?;
    up.put_one(&rp, &record_name(&job.shard), &opts.control)?;
    Ok(JobOutcome {
        record,
        already_done: false,
        lossy_layers,
    })
}

/// Finishes the plan (see the module's text): the files committed, and
/// the warnings.
pub(super) fn finish(
    plan: &JobPlan,
    id: &str,
    opts: &ConvertOptions,
) -> Result<(Vec<String>, Vec<String>)> {
    let probe = Upload::for_job(&plan.output)?;
    let mut missing = Vec::new();
    for (k, job) in plan.jobs.iter().enumerate() {
        if done(&probe, id, k, job)?.is_none() {
            missing.push(format!("{k} ({})", job.shard));
        }
    }
    drop(probe);
    if !missing.is_empty() {
        return Err(job_error(format!(
            "{} of {} job(s) not done (no record, or an object that does not match it): {}; \
             run them, then finish",
            missing.len(),
            plan.jobs.len(),
            missing.join(", ")
        ))
        .with_file(&plan.output));
    }
    let at = locate(&plan.input)?;
    let input: &Path = &at.path;
    check_pins(plan, &at)?;
    let raw = open_input(input)?;
    let (_src, d) = reopen(plan, &at, raw.as_ref(), opts)?;
    let shards: Vec<String> = plan.jobs.iter().map(|j| j.shard.clone()).collect();
    let up = Upload::prepare_with(&plan.output, opts.overwrite, &shards)?;
    let out = AtomicDir::create(up.path(), false)?;
    if input.is_dir() {
        carry_model_files(input, out.path(), &opts.control)?;
    }
    // the jobs' objects stand in the staged directory as empty files: the
    // output record lists them, the upload does not send them
    for s in &shards {
        let p = out.path().join(s);
        std::fs::File::create(&p).map_err(|e| Error::from(e).with_file(&p))?;
    }
    write_model_tail(&d.plan, &d.groups, out.path(), &d.stem)?;
    let warnings: Vec<String> = update_config(input, &out.path().join("config.json"), &d.plan)?
        .into_iter()
        .collect();
    out.commit()?;
    up.already_stored(shards.iter().cloned());
    up.commit(&opts.control)?;
    Ok((shards, warnings))
}
