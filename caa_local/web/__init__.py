"""The steering page's static files (index.html, app.js, chart.js, style.css), served by caa_local.serve.web."""
