document.addEventListener('keydown', (e) => {
  if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return;
  const rel = e.key === 'ArrowLeft' ? 'prev' : e.key === 'ArrowRight' ? 'next' : null;
  const a = rel && document.querySelector('nav.pager a[rel="' + rel + '"]');
  if (a) window.location.href = a.href;
});