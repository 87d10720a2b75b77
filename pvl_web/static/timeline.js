// The relevance strip under a result card: the video's length from left to right, each step
// of the hit's timeline coloured by how well it matches the search (stronger = better), its
// moments marked beneath it (the best one brighter). A click maps its position to seconds
// and hands them to app.js, which plays the video from there.
// Loaded before app.js; uses its clock() only when an event comes.
"use strict";

const STRIP_RGB = "79, 124, 255"; // --accent in app.css

function timelineLength(hit) {
  // Seconds the strip spans: its steps times their length (the video's length).
  const line = hit.timeline;
  return line && line.scores.length ? line.step_s * line.scores.length : 0;
}

function stripCanvas(scores) {
  // One pixel per step; CSS stretches it to the card's width, blending neighbouring steps.
  // Colours are relative to the video's own range: where in it the match is (the card's
  // score says how well it matches against the other videos).
  const finite = scores.filter((s) => s !== null);
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const canvas = document.createElement("canvas");
  canvas.width = scores.length;
  canvas.height = 1;
  const ctx = canvas.getContext("2d");
  scores.forEach((score, i) => {
    const t = hi > lo && score !== null ? (score - lo) / (hi - lo) : 1;
    ctx.fillStyle = `rgba(${STRIP_RGB}, ${(0.1 + 0.9 * t * t).toFixed(3)})`;
    ctx.fillRect(i, 0, 1, 1);
  });
  return canvas;
}

function timelineStrip(hit, onSeek) {
  // A button (focusable, Enter and Space work): a pointer click plays from where it lands,
  // a key press from the best moment's start.
  const length = timelineLength(hit);
  const best = hit.moments[0] || hit.best;
  const strip = document.createElement("button");
  strip.type = "button";
  strip.className = "timeline";
  strip.dataset.length = String(length);
  strip.setAttribute("aria-label", `Relevance along the video (${clock(length)}), best moment `
    + `${clock(best.start_s)}–${clock(best.end_s)}: click a point to play from there`);
  strip.append(stripCanvas(hit.timeline.scores));
  hit.moments.forEach((moment, i) => {
    const mark = document.createElement("span");
    mark.className = i === 0 ? "mark best" : "mark";
    mark.style.left = `${(100 * moment.start_s) / length}%`;
    mark.style.width = `${(100 * (moment.end_s - moment.start_s)) / length}%`;
    strip.append(mark);
  });
  const secondsAt = (event) => {
    const box = strip.getBoundingClientRect();
    return Math.min(1, Math.max(0, (event.clientX - box.left) / box.width)) * length;
  };
  strip.addEventListener("mousemove", (event) => {
    strip.title = `Play from ${clock(secondsAt(event))}`;
  });
  strip.addEventListener("click", (event) => {
    onSeek(event.detail === 0 ? best.start_s : secondsAt(event)); // detail 0: Enter or Space
  });
  return strip;
}
