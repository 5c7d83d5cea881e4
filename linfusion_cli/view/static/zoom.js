// A deep-zoom page: OpenSeadragon on the tile source written into the page (#view-config). The tile source is
// inline, not a .dzi URL, because a page opened from file:// may not fetch files by XMLHttpRequest; tiles are
// <img> loads, which file:// allows.
(function () {
  "use strict";
  var box = document.getElementById("viewer");
  var readout = document.getElementById("zoom-readout");
  var config = JSON.parse(document.getElementById("view-config").textContent);
  if (typeof OpenSeadragon === "undefined") {
    box.classList.add("missing");
    box.textContent = "The viewer's JavaScript did not load from " + config.script +
      " (offline?). Rebuild the site without --viewer-js: the copy shipped with linfusion works offline.";
    return;
  }
  var viewer = OpenSeadragon({
    element: box,
    tileSources: config.tileSource,
    prefixUrl: config.buttons || "",
    showNavigationControl: Boolean(config.buttons),
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    // WebGL cannot take tiles from file:// as textures (cross-origin) and warns while falling back: draw with canvas.
    drawer: "canvas",
    maxZoomPixelRatio: config.maxZoomPixelRatio,  // down to single pixels, each drawn as a square of screen pixels
    visibilityRatio: 0.5,
    crossOriginPolicy: false,
    timeout: 120000
  });
  var smooth = true;
  function update() {
    var pixels = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));
    // Past 1:1 an image pixel is a sharp square, not a blur; below it, smoothing keeps the shrunk levels clean.
    if ((pixels < 1) !== smooth) {
      smooth = pixels < 1;
      viewer.drawer.setImageSmoothingEnabled(smooth);
    }
    if (readout) {
      readout.textContent = pixels >= 1
        ? "zoom " + pixels.toFixed(pixels < 10 ? 1 : 0) + "x: one image pixel is " + pixels.toFixed(1) + " screen pixels"
        : "zoom 1:" + (1 / pixels).toFixed(1) + ": one screen pixel shows " + (1 / pixels).toFixed(1) + " image pixels across";
    }
  }
  viewer.addHandler("open", update);
  viewer.addHandler("animation", update);
  viewer.addHandler("animation-finish", update);
  window.linfusionViewer = viewer;  // for the browser console (and the tests)
})();
