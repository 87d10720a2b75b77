// The pvl-search page: calls GET /search, shows a card per video (thumbnail of the best
// moment, its start-end time, path, score, the relevance strip of timeline.js), and plays a
// video from the moment's start or from where the strip is clicked. "More like this" asks
// GET /search?like=SEGMENT_ID (the card's best moment) with the same filters.
// Everything comes from this server; text from results is set with textContent, never HTML.
"use strict";

const PAGE = 12; // videos per page; "More results" asks for PAGE more
const MAX_K = 100; // the API's most videos per response
const SINGLE_RERANK_K = 16; // single rerank decodes each candidate again: keep it small

const $ = (id) => document.getElementById(id);
// like: null for a text search, else {segment, label} ("more like this moment").
const state = { k: PAGE, hits: [], request: 0, selected: -1, like: null };

// ----------------------------------------------------------------------------- helpers

function clock(seconds) {
  // 75.5 -> "1:15.5", 5 -> "0:05"
  const tenths = Math.round(seconds * 10);
  const minutes = Math.floor(tenths / 600);
  const rest = (tenths - minutes * 600) / 10;
  const whole = Number.isInteger(rest);
  const text = whole ? String(rest) : rest.toFixed(1);
  return `${minutes}:${text.padStart(whole ? 2 : 4, "0")}`;
}

function hundredths(seconds) {
  // 9.833333333333332 -> "9.83", 2 -> "2": a media fragment short enough to read
  return String(Number(seconds.toFixed(2)));
}

function splitPath(path) {
  const cut = path.lastIndexOf("/");
  return cut < 0 ? ["", path] : [path.slice(0, cut + 1), path.slice(cut + 1)];
}

function extension(path) {
  const name = splitPath(path)[1];
  const dot = name.lastIndexOf(".");
  return dot < 0 ? "" : name.slice(dot).toLowerCase();
}

function say(text) {
  $("status").textContent = text;
}

function detailText(detail) {
  // FastAPI: a string (400/404/503) or a list of {loc, msg} (422).
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).slice(-1)[0] || "input"}: ${d.msg}`).join("; ");
  }
  return "the server could not answer";
}

// ----------------------------------------------------------------------------- search

function searchParams() {
  // What the address bar keeps: the text (also while showing "more like this", for the way
  // back), and either the rerank mode or the segment to search like.
  const params = new URLSearchParams();
  params.set("q", $("q").value.trim());
  const rerank = $("rerank").value;
  if (state.like) {
    params.set("like", String(state.like.segment)); // retrieval only: no rerank
  } else {
    if (rerank !== "auto") params.set("rerank", rerank);
    if (rerank === "single") params.set("rerank_k", String(SINGLE_RERANK_K));
  }
  const glob = $("glob").value.trim();
  if (glob) params.set("glob", glob);
  if ($("min-duration").value !== "") params.set("min_duration", $("min-duration").value);
  if ($("max-duration").value !== "") params.set("max_duration", $("max-duration").value);
  if ($("since").value) params.set("since", `${$("since").value}T00:00:00`);
  return params;
}

async function search({ more = false } = {}) {
  const query = $("q").value.trim();
  showLike();
  if (!query && !state.like) {
    say("Type what to look for, then press Enter.");
    return;
  }
  state.k = more ? Math.min(state.k + PAGE, MAX_K) : PAGE;
  const request = ++state.request;
  const params = searchParams();
  // The address bar keeps the search (without k), so a reload or a link shows it again.
  history.replaceState(null, "", `?${params}`);
  params.set("k", String(state.k));
  if (state.like) params.delete("q"); // the API takes one or the other
  say("Searching…");
  let response;
  let body;
  try {
    response = await fetch(`/search?${params}`, { headers: { Accept: "application/json" } });
    body = await response.json().catch(() => ({}));
  } catch (error) {
    if (request === state.request) say("The server cannot be reached.");
    return;
  }
  if (request !== state.request) return; // a newer search has started
  if (response.status === 401) {
    window.location.assign("/"); // signed out: the server shows its sign-in form
    return;
  }
  if (!response.ok) {
    say(`Not searched: ${detailText(body.detail)}`);
    show([]);
    $("more").hidden = true;
    return;
  }
  const hits = body.hits || [];
  if (state.like && !state.like.label) labelLike(hits);
  show(hits, more);
  const ms = body.timings_ms ? ` in ${Math.round(body.timings_ms.total)} ms` : "";
  const note = body.truncated ? " (the query is longer than the model reads; its end was ignored)" : "";
  say(hits.length ? `${hits.length} video${hits.length === 1 ? "" : "s"}${ms}${note}` : `No matching videos${ms}.`);
  $("more").hidden = hits.length < state.k || state.k >= MAX_K;
}

function moreLike(index) {
  // Search with the segment that ranked the card's video (its best moment's peak) instead of
  // the text, keeping the filters.
  const hit = state.hits[index];
  const segment = (hit.moments[0] || hit.best).segment_id;
  state.like = { segment, label: segmentLabel(hit, segment) };
  search();
}

function segmentLabel(hit, segment) {
  // "0:04–0:06 of name.mp4": the segment's own span (the card shows the moment grown from it).
  const span = hit.best.segment_id === segment ? hit.best : hit.moments.find((m) => m.segment_id === segment);
  const name = splitPath(hit.path)[1];
  return span ? `${clock(span.start_s)}–${clock(span.end_s)} of ${name}` : `a moment of ${name}`;
}

function labelLike(hits) {
  // Opened from a link: the segment's own video comes first unless the filters leave it out.
  const segment = state.like.segment;
  const own = hits.find((h) => h.best.segment_id === segment || h.moments.some((m) => m.segment_id === segment));
  state.like.label = own ? segmentLabel(own, segment) : `segment ${segment}`;
  showLike();
}

function showLike() {
  // The note saying what is shown, with the way back to the text query.
  const like = state.like;
  $("like-bar").hidden = !like;
  $("rerank").disabled = Boolean(like); // a like search is retrieval only
  if (!like) return;
  $("like-note").textContent = `Videos like ${like.label || `segment ${like.segment}`}`;
  const query = $("q").value.trim();
  $("like-back").textContent = query ? `Back to “${query}”` : "Back";
}

function backToText() {
  state.like = null;
  search();
  $("q").focus();
}

// ----------------------------------------------------------------------------- results

function card(hit, index) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.index = String(index);
  button.dataset.videoId = String(hit.video_id);
  const best = hit.moments[0] || hit.best; // the best moment: the ranking's segment, grown
  button.dataset.start = String(best.start_s);
  button.dataset.end = String(best.end_s);
  const [folder, name] = splitPath(hit.path);
  button.title = hit.path;

  let thumb;
  if (hit.thumbnail_url) {
    thumb = document.createElement("img");
    thumb.src = hit.thumbnail_url;
    thumb.alt = `${name} at ${clock(best.start_s)}`;
    thumb.decoding = "async";
  } else {
    thumb = document.createElement("div");
    thumb.textContent = "no preview";
    thumb.classList.add("none");
  }
  thumb.classList.add("thumb");

  const meta = document.createElement("span");
  meta.className = "meta";
  const top = document.createElement("span");
  top.className = "top";
  const moment = document.createElement("span");
  moment.className = "moment";
  moment.textContent = `${clock(best.start_s)}–${clock(best.end_s)}`;
  moment.title = "the best moment";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score === null ? "–" : hit.score.toFixed(3);
  score.title = "score (retrieval similarity + rerank logit)";
  top.append(moment, score);
  const file = document.createElement("span");
  file.className = "name";
  file.textContent = name;
  const where = document.createElement("span");
  where.className = "path";
  where.textContent = folder;
  meta.append(top, file, where);

  button.append(thumb, meta);
  button.addEventListener("click", () => play(index));
  const item = document.createElement("li");
  item.className = "result";
  item.append(button);
  if (timelineLength(hit) > 0 && !hit.media_type.startsWith("image/")) {
    item.append(timelineStrip(hit, (seconds) => play(index, seconds)));
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  const others = document.createElement("span");
  others.className = "others";
  const more = hit.moments.length - 1;
  others.textContent = more > 0 ? `+${more} moment${more === 1 ? "" : "s"}` : "";
  const like = document.createElement("button");
  like.type = "button";
  like.className = "like";
  like.textContent = "More like this";
  like.title = `Videos like ${segmentLabel(hit, best.segment_id)}`;
  like.addEventListener("click", () => moreLike(index));
  actions.append(others, like);
  item.append(actions);
  return item;
}

function show(hits, keepFocus = false) {
  const focused = keepFocus ? document.activeElement?.dataset?.index : undefined;
  state.hits = hits;
  state.selected = -1;
  $("results").replaceChildren(...hits.map(card));
  if (focused !== undefined) cards()[Number(focused)]?.focus();
}

function cards() {
  return [...$("results").querySelectorAll(".card")];
}

function columns() {
  const template = getComputedStyle($("results")).gridTemplateColumns;
  return Math.max(1, template.split(" ").filter(Boolean).length);
}

// ----------------------------------------------------------------------------- player

function canPlay(mediaType) {
  return document.createElement("video").canPlayType(mediaType) !== "";
}

function play(index, from) {
  // From the best moment (played to its end), or from `from` seconds on (a strip click).
  const hit = state.hits[index];
  if (!hit) return;
  const { start_s: start, end_s: end } = hit.moments[0] || hit.best;
  const [folder, name] = splitPath(hit.path);
  $("player-time").textContent = from === undefined ? `${clock(start)}–${clock(end)}` : `from ${clock(from)}`;
  const playing = $("stage").querySelector("video");
  if (from !== undefined && state.selected === index && playing && !playing.error && !$("player").hidden) {
    playing.currentTime = from; // the same video: seek it, no reload
    playing.play().catch(() => {});
    return;
  }
  state.selected = index;
  cards().forEach((c, i) => c.setAttribute("aria-current", String(i === index)));
  const at = from === undefined ? start : from;
  $("player-title").textContent = name;
  $("player-path").textContent = folder;
  $("download").href = `${hit.video_url}?download=1`;
  $("download").textContent = `Download ${name}`;
  $("player-note").hidden = true;
  const stage = $("stage");
  stage.replaceChildren();

  if (hit.media_type.startsWith("image/")) {
    const image = document.createElement("img");
    image.src = hit.video_url;
    image.alt = name;
    stage.append(image);
  } else if (canPlay(hit.media_type)) {
    const video = document.createElement("video");
    video.controls = true;
    video.preload = "auto";
    video.playsInline = true;
    // The media fragment starts (and pauses) playback at the moment; the seek below is
    // for browsers that ignore fragments.
    video.src = `${hit.video_url}#t=${from === undefined ? `${hundredths(start)},${hundredths(end)}` : hundredths(from)}`;
    video.addEventListener("loadedmetadata", () => {
      if (Math.abs(video.currentTime - at) > 0.05) video.currentTime = at;
    }, { once: true });
    video.addEventListener("error", () => unplayable(hit, "This browser could not decode this video.", at),
      { once: true });
    stage.append(video);
    video.play().catch(() => {}); // refused autoplay leaves the controls to the viewer
  } else {
    unplayable(hit, `This browser cannot play ${extension(hit.path) || "these"} files.`, at);
  }
  $("player").hidden = false;
  $("player").scrollIntoView({ block: "nearest" });
}

function unplayable(hit, why, at) {
  // The best moment's thumbnail and a download link instead of a broken player.
  const stage = $("stage");
  stage.replaceChildren();
  if (hit.thumbnail_url) {
    const image = document.createElement("img");
    image.className = "still";
    image.src = hit.thumbnail_url;
    image.alt = "thumbnail of the moment";
    stage.append(image);
  }
  $("player-note").textContent = `${why} Download it to watch it from ${clock(at)}.`;
  $("player-note").hidden = false;
}

function closePlayer() {
  $("stage").replaceChildren(); // stops playback and the download of the video
  $("player").hidden = true;
  const back = cards()[state.selected];
  if (back) back.focus();
}

// ----------------------------------------------------------------------------- keyboard

function onKey(event) {
  const typing = event.target.closest("input, select, textarea");
  if (event.key === "/" && !typing) {
    event.preventDefault();
    $("q").focus();
    $("q").select();
    return;
  }
  if (event.key === "Escape") {
    if (!$("player").hidden) closePlayer();
    else if (typing) event.target.blur();
    return;
  }
  const all = cards();
  if (!all.length || typing) {
    if (event.key === "ArrowDown" && event.target === $("q") && all.length) {
      event.preventDefault();
      all[0].focus();
    }
    return;
  }
  // Focus on a card's strip or button counts as on the card.
  const at = all.findIndex((c) => c.parentElement.contains(document.activeElement));
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns() }[event.key];
  if (step === undefined) return;
  event.preventDefault();
  if (at < 0) {
    all[0].focus();
  } else if (at + step < 0 && event.key === "ArrowUp") {
    $("q").focus();
  } else {
    all[Math.min(all.length - 1, Math.max(0, at + step))].focus();
  }
}

// ----------------------------------------------------------------------------- start

function restore() {
  // A search in the address bar (a reload or a shared link) is run again.
  const params = new URLSearchParams(window.location.search);
  $("q").value = params.get("q") || "";
  $("rerank").value = ["auto", "stacked", "patch", "joint", "mixed", "latent", "single", "none"].includes(params.get("rerank")) ? params.get("rerank") : "auto";
  $("glob").value = params.get("glob") || "";
  $("min-duration").value = params.get("min_duration") || "";
  $("max-duration").value = params.get("max_duration") || "";
  $("since").value = (params.get("since") || "").slice(0, 10);
  const like = params.get("like") || "";
  state.like = /^\d+$/.test(like) ? { segment: Number(like), label: "" } : null;
  if ($("q").value || state.like) search();
  else $("q").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.like = null; // a text search
    search();
  });
  $("like-back").addEventListener("click", backToText);
  // A changed filter applies at once (text fields on Enter or when they lose focus).
  for (const id of ["glob", "min-duration", "max-duration", "since", "rerank"]) {
    $(id).addEventListener("change", () => search());
  }
  $("more").addEventListener("click", () => search({ more: true }));
  $("close").addEventListener("click", closePlayer);
  document.addEventListener("keydown", onKey);
  restore();
});
