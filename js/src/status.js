// A view's status line: busy while Python computes (with chunk progress), a note when done, the
// error Python sent when it failed. The target is any element; failing marks it as an error.

export function busy(target, text) {
  target.className = "hydra-status is-busy";
  target.textContent = text;
}

export function done(target, text = "") {
  target.className = "hydra-status";
  target.textContent = text;
}

/** An error handler for requests: shows the message (Python's "Type: message") on `target`. */
export const fail = (target) => (err) => {
  target.className = "hydra-status hydra-error";
  target.textContent = String(err && err.message ? err.message : err);
};

/** A progress handler for requests: "<what>… done/total chunks". */
export const progress = (target, what) => (d, total) => {
  target.textContent = `${what}\u2026 ${d}/${total} chunks`;
};
