"""The report page's script: a small graph viewer written for the page (no library, no network).

It reads the graph from `<script id="graph-data" type="application/json">` and draws it as SVG:

  * groups: every module path ("encoder.layer.3.attention") is a group; a collapsed group is one box
    (its op count and a bar of its dtypes); the page starts collapsed at the layer level (the first
    numbered module, "layer.3"), or fully expanded when the graph has at most 200 drawn nodes;
  * layout: items (nodes and collapsed groups) in graph order; layer = 1 + the deepest input's layer;
    within a layer, ordered by the mean x of their inputs (one barycenter sweep), then packed;
    expanded groups get a frame around what they hold, its title collapses it;
  * edges carry the source's shape and dtype ("2x8x32 bf16"), coloured by dtype;
  * search by node name, op or module (Enter or a click reveals the node: its groups expand);
  * a side panel with the selected node's decision, rule, reason, FP8 record and measured figures;
  * before/after: "before" colours by the original dtype and hides the casts the rewriter added.

`#node=NAME` in the address opens the page with that node revealed and selected.
Hooks for the browser tests: `#selftest` drives collapse, expand, search, select and the toggle and
writes `data-selftest="ok"` (or the problems); `#perf` expands everything, draws it and writes
`data-render-ms` and `data-render-ok` ("1" when under 3 s) on <body>.
"""
from __future__ import annotations

__all__ = ["SCRIPT"]

SCRIPT = r"""
(function(){
'use strict';
var body=document.body, errors=[];
window.addEventListener('error',function(e){errors.push(String(e.message));
  body.setAttribute('data-js-errors',errors.join(' | '));});
var D=JSON.parse(document.getElementById('graph-data').textContent);
var COL=D.colors, N=D.nodes, byName={}, groups={}, expanded={}, mode='after', sel=null, zoom=1;
var svg=document.getElementById('graph'), pic=document.getElementById('picture');
var panel=document.getElementById('panel'), W=0, H=0, pos={}, items=[];
var NW=168, NH=32, GW=210, GH=34, DX=16, DY=30, M=24;
function esc(s){return String(s==null?'':s).replace(/[&<>"']/g,function(c){
  return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c];});}
function sh(d){return D.short[d]||d||'-';}
function col(d){return COL[d]||COL['none'];}
N.forEach(function(x,i){x.id=i;byName[x.n]=i;});
N.forEach(function(x){x.ins=[];x.outs=[];});
N.forEach(function(x){(x.in||[]).forEach(function(n){var p=byName[n];
  if(p!==undefined&&p!==x.id){x.ins.push(p);N[p].outs.push(x.id);}});});
function chain(m){if(!m)return [];var parts=m.split('.'),out=[];
  for(var i=1;i<=parts.length;i++){out.push(parts.slice(0,i).join('.'));}return out;}
function group(p){if(!groups[p]){var parts=p.split('.');groups[p]={p:p,depth:parts.length,
  last:parts[parts.length-1],parent:parts.slice(0,-1).join('.'),kids:[],nodes:[],dt:{},casts:0};
  if(parts.length>1){group(parts.slice(0,-1).join('.')).kids.push(p);}}return groups[p];}
N.forEach(function(x){x.chain=chain(x.m);x.chain.forEach(function(p){var g=group(p);g.nodes.push(x.id);
  if(x.k==='cast'&&x.ch!=='removed'){g.casts++;}
  if(x.k==='compute'&&x.cd){g.dt[x.cd]=(g.dt[x.cd]||0)+1;}});});
function shown(x){if(x.k==='weight')return false;
  if(mode==='after'){return x.ch!=='removed'&&!(x.k==='compute'&&!x.od&&!x.nd&&!x.cd);}
  return x.ch!=='added';}
function dtypeOf(x){return mode==='after'?(x.cd||x.nd):x.od;}
function alias(i,depth){var x=N[i];if(shown(x))return i;if(depth>50||x.ch!=='added'||x.k!=='cast')return -1;
  return x.ins.length?alias(x.ins[0],(depth||0)+1):-1;}
function rep(x){for(var i=0;i<x.chain.length;i++){if(!expanded[x.chain[i]])return 'g:'+x.chain[i];}
  return 'n:'+x.id;}
function collapseToLayers(){expanded={};Object.keys(groups).forEach(function(p){
  var g=groups[p];expanded[p]=g.nodes.length<=1||!/^\d+$/.test(g.last);});
  var drawn=N.filter(shown).length;
  if(drawn<=200){expandAll();return;}
  if(build(true)>400){Object.keys(groups).forEach(function(p){expanded[p]=groups[p].nodes.length<=1;});}}
function expandAll(){Object.keys(groups).forEach(function(p){expanded[p]=true;});}
function build(countOnly){
  var map={},list=[],edges={};
  N.forEach(function(x){if(!shown(x))return;var k=rep(x);
    if(!map[k]){map[k]={k:k,first:x.id,ins:{},n:0,hit:false};list.push(map[k]);}map[k].n++;});
  if(countOnly)return list.length;
  N.forEach(function(x){if(!shown(x))return;var b=rep(x);
    x.ins.forEach(function(p){var a=alias(p);if(a<0)return;var ka=rep(N[a]);
      if(ka===b)return;var key=ka+'>'+b;if(!edges[key]){edges[key]={a:ka,b:b,src:a};map[b].ins[ka]=1;}});});
  items=list;return {map:map,list:list,edges:Object.keys(edges).map(function(k){return edges[k];})};}
function layout(g){
  var order={};g.list.forEach(function(it,i){order[it.k]=i;});
  var layer={},rows=[];
  g.list.forEach(function(it){var l=0;Object.keys(it.ins).forEach(function(a){
    if(order[a]<order[it.k]){l=Math.max(l,layer[a]+1);}});layer[it.k]=l;(rows[l]=rows[l]||[]).push(it);});
  pos={};W=0;
  rows.forEach(function(row,l){
    row.forEach(function(it){var xs=Object.keys(it.ins).filter(function(a){return pos[a];}).map(function(a){
      return pos[a].x+pos[a].w/2;});it.c=xs.length?xs.reduce(function(s,v){return s+v;},0)/xs.length:0;});
    row.sort(function(a,b){return a.c-b.c;});
    var free=M;row.forEach(function(it){var w=it.k[0]==='g'?GW:NW,h=it.k[0]==='g'?GH:NH;
      var x=Math.max(free,it.c-w/2);pos[it.k]={x:x,y:M+18+l*(NH+DY),w:w,h:h,l:l,col:0};free=x+w+DX;W=Math.max(W,free);});});
  H=M+18+rows.length*(NH+DY)+M;W+=M;
  // a long narrow graph (a stack of collapsed layers) wraps into columns that fill the panel
  // (each band of layers is as wide as its own widest layer; the number of bands that gives the largest
  // zoom at which everything fits the panel)
  var ph=pic.clientHeight||700,pw=pic.clientWidth||1100,keys=Object.keys(pos),best=null,
    bestZ=Math.min(1,pw/W,ph/H);
  for(var k=2;k<=Math.min(12,Math.ceil(H/ph)*2);k++){var per=Math.ceil(rows.length/k),wid=[];
    keys.forEach(function(key){var q=pos[key],c=Math.floor(q.l/per);wid[c]=Math.max(wid[c]||0,q.x+q.w+30);});
    var tot=wid.reduce(function(s,v){return s+(v||0);},0),z=Math.min(1,pw/(tot+M),ph/(M+18+per*(NH+DY)+M));
    if(z>bestZ*1.05){bestZ=z;best={per:per,wid:wid,tot:tot};}}
  if(best){var off=[0];for(var c=1;c<best.wid.length;c++){off[c]=off[c-1]+(best.wid[c-1]||0);}
    keys.forEach(function(key){var q=pos[key],c=Math.floor(q.l/best.per);
      q.col=c;q.x+=off[c];q.y-=c*best.per*(NH+DY);});W=best.tot+M;H=M+18+best.per*(NH+DY)+M;}}
function bar(g,w){var tot=0,x=0,out='';Object.keys(g.dt).forEach(function(d){tot+=g.dt[d];});
  Object.keys(g.dt).sort().forEach(function(d){var bw=tot?w*g.dt[d]/tot:0;
    out+='<rect class="bar" x="'+x.toFixed(1)+'" y="'+(GH-6)+'" width="'+bw.toFixed(1)+'" height="6" fill="'+col(d)+'"/>';x+=bw;});
  return out;}
function render(){
  var g=build(false);layout(g);var out=[],labels=D.edgeLabels&&document.getElementById('elabels').checked;
  var many=g.edges.length>3000;
  Object.keys(groups).forEach(function(p){if(!expanded[p])return;var gr=groups[p];
    var box={},c=0;
    g.list.forEach(function(it){var q=pos[it.k],x=it.k[0]==='g'?it.k.slice(2):N[it.first].m||'';
      if(x===p||x.indexOf(p+'.')===0){c++;var b=box[q.col]=box[q.col]||[1e9,1e9,-1e9,-1e9];
        b[0]=Math.min(b[0],q.x);b[1]=Math.min(b[1],q.y);b[2]=Math.max(b[2],q.x+q.w);b[3]=Math.max(b[3],q.y+q.h);}});
    if(c<2)return;var segs=Object.keys(box).sort(),fr='<g class="frame" data-group="'+esc(p)+'">';
    segs.forEach(function(col,j){var b=box[col];fr+='<rect x="'+(b[0]-6)+'" y="'+(b[1]-16)+'" width="'+
      (b[2]-b[0]+12)+'" height="'+(b[3]-b[1]+22)+'" rx="6"/>';
      if(j===0){fr+='<text class="ft" x="'+(b[0]-2)+'" y="'+(b[1]-5)+'">\u25BE '+esc(p)+'</text>';}});
    out.push(fr+'</g>');});
  g.edges.forEach(function(e){var a=pos[e.a],b=pos[e.b];if(!a||!b)return;
    var ax=a.x+a.w/2,ay=a.y+a.h,bx=b.x+b.w/2,by=b.y,back=by<=ay,s=N[e.src],d=dtypeOf(s);
    var path=back?'M'+ax+' '+ay+'C'+(ax+60)+' '+(ay+40)+' '+(bx+60)+' '+(by-40)+' '+bx+' '+by:
      'M'+ax+' '+ay+'C'+ax+' '+((ay+by)/2)+' '+bx+' '+((ay+by)/2)+' '+bx+' '+by;
    out.push('<path class="e" d="'+path+'" stroke="'+(D.edge[d]||'#9aa0a6')+'"/>');
    if(labels&&!many&&(s.sh||d)){out.push('<text class="el" x="'+((ax+bx)/2+4)+'" y="'+((ay+by)/2+3)+'">'+
      esc((s.sh||'')+' '+sh(d))+'</text>');}});
  g.list.forEach(function(it){var q=pos[it.k];
    if(it.k[0]==='g'){var gr=groups[it.k.slice(2)];
      out.push('<g class="grp" data-key="'+esc(it.k)+'" transform="translate('+q.x+','+q.y+')">'+
        '<rect width="'+GW+'" height="'+GH+'" rx="4"/>'+bar(gr,GW)+'<text x="8" y="13">\u25B8 '+
        esc(gr.p)+'</text><text class="sub" x="8" y="24">'+it.n+' ops'+(gr.casts?', '+gr.casts+' casts':'')+
        '</text></g>');return;}
    var x=N[it.first],d=dtypeOf(x),cls='node'+(x.k==='cast'?' cast':'')+(x.ch!=='none'?' changed':'')+
      (x.ch==='removed'?' removed':'')+(x.k==='compute'&&d==='float32'&&D.lowp?' island':'');
    out.push('<g class="'+cls+'" data-key="n:'+x.id+'" data-name="'+esc(x.n)+'" transform="translate('+
      q.x+','+q.y+')"><rect width="'+NW+'" height="'+NH+'" rx="'+(x.k==='cast'?12:3)+'" fill="'+col(d)+
      '"/><text x="8" y="13" class="op">'+esc(x.k==='cast'?'cast \u2192 '+sh(x.nd):x.o).slice(0,26)+
      '</text><text class="sub" x="8" y="26">'+esc(x.n.slice(0,28))+'</text></g>');});
  svg.innerHTML=out.join('');setZoom(zoom);markHits();if(sel!==null){highlight();}
  body.setAttribute('data-graph-nodes',String(svg.querySelectorAll('g.node').length));
  body.setAttribute('data-graph-groups',String(svg.querySelectorAll('g.grp').length));
  return g.list.length;}
function setZoom(z){zoom=Math.max(0.1,Math.min(3,z));svg.setAttribute('viewBox','0 0 '+W+' '+H);
  svg.setAttribute('width',W*zoom);svg.setAttribute('height',H*zoom);
  document.getElementById('zoomv').textContent=Math.round(zoom*100)+'%';}
function fit(){setZoom(Math.min(1,Math.max(0.3,Math.min(pic.clientWidth/W,pic.clientHeight/H))));}
function reveal(i){var x=N[i];if(!shown(x)){setMode(x.ch==='added'?'after':'before');}
  x.chain.forEach(function(p){expanded[p]=true;});res.innerHTML='';render();select('n:'+i,true);}
function highlight(){Array.prototype.forEach.call(svg.querySelectorAll('.sel'),function(e){e.classList.remove('sel');});
  var k=sel===null?null:sel;if(!k)return;var el=svg.querySelector('[data-key="'+k+'"]');if(el){el.classList.add('sel');}
  return el;}
function select(k,scroll){sel=k;var el=highlight();showPanel(k);
  if(el&&scroll){var q=pos[k];pic.scrollTo({left:(q.x+q.w/2)*zoom-pic.clientWidth/2,top:q.y*zoom-pic.clientHeight/2});}
  if(k[0]==='n'){var r=document.getElementById('row-'+N[+k.slice(2)].n);
    Array.prototype.forEach.call(document.querySelectorAll('tr.sel'),function(t){t.classList.remove('sel');});
    if(r){r.classList.add('sel');}}}
function kv(k,v){return v==null||v===''?'':'<dt>'+esc(k)+'</dt><dd>'+v+'</dd>';}
function obj(o){if(!o)return '';return '<table class="kv">'+Object.keys(o).map(function(k){
  var v=o[k];return '<tr><td>'+esc(k)+'</td><td>'+esc(typeof v==='object'?JSON.stringify(v):v)+'</td></tr>';}).join('')+'</table>';}
function link(i){return '<a href="#" data-node="'+i+'">'+esc(N[i].n)+'</a>';}
function showPanel(k){var h;
  if(k[0]==='g'){var gr=groups[k.slice(2)];
    h='<h3>'+esc(gr.p)+'</h3><p class="dim">module, collapsed</p><dl>'+kv('ops',String(gr.nodes.length))+
      kv('casts',String(gr.casts))+kv('computes',Object.keys(gr.dt).map(function(d){return sh(d)+' '+gr.dt[d];}).join(', '))+
      '</dl><button type="button" id="pexpand">expand</button>';}
  else{var x=N[+k.slice(2)];
    h='<h3>'+esc(x.n)+'</h3><p class="dim">'+esc(x.o)+' \u00b7 '+esc(x.k)+(x.m?' \u00b7 '+esc(x.m):'')+'</p><dl>'+
      kv('dtype',esc(sh(x.od)+' \u2192 '+sh(x.nd)))+kv('computes in',x.cd?esc(sh(x.cd)):'')+kv('shape',esc(x.sh||''))+
      kv('change',esc(x.ch))+kv('rule',esc(x.r||''))+kv('reason',esc(x.why||''))+
      (x.f8?kv(x.f8.use?'FP8':'not FP8',esc(x.f8.reason||'')+obj(Object.assign({},x.f8,{reason:undefined}))):'')+
      kv('range',x.ex&&x.ex.range?obj(x.ex.range):'')+kv('sensitivity',x.ex&&x.ex.sensitivity?obj(x.ex.sensitivity):'')+
      kv('bytes',x.ex&&x.ex.bytes_before!=null?esc(x.ex.bytes_before+' \u2192 '+x.ex.bytes_after):'')+
      kv('inputs',x.ins.map(link).join(', '))+kv('users',x.outs.map(link).join(', '))+'</dl>';}
  panel.innerHTML=h;var b=document.getElementById('pexpand');
  if(b){b.onclick=function(){expanded[k.slice(2)]=true;render();};}}
panel.addEventListener('click',function(e){var a=e.target.closest('a[data-node]');
  if(a){e.preventDefault();reveal(+a.getAttribute('data-node'));}});
svg.addEventListener('click',function(e){var t=e.target.closest('g.grp,g.node,g.frame');if(!t)return;
  if(t.classList.contains('frame')){if(e.target.classList.contains('ft')){expanded[t.getAttribute('data-group')]=false;
    render();}return;}
  var k=t.getAttribute('data-key');
  if(k[0]==='g'&&sel===k){expanded[k.slice(2)]=true;render();return;}select(k,false);});
svg.addEventListener('dblclick',function(e){var t=e.target.closest('g.grp');
  if(t){expanded[t.getAttribute('data-key').slice(2)]=true;render();}});
var q=document.getElementById('search'),res=document.getElementById('results'),hits=[];
function search(s){s=s.trim().toLowerCase();hits=[];if(!s){res.innerHTML='';markHits();return hits;}
  N.forEach(function(x){if(x.k!=='weight'&&(x.n.toLowerCase().indexOf(s)>=0||x.o.toLowerCase().indexOf(s)>=0||
    (x.m||'').toLowerCase().indexOf(s)>=0)){hits.push(x.id);}});
  res.innerHTML='<div class="dim">'+hits.length+' found</div>'+hits.slice(0,30).map(function(i){
    return '<div class="hit" data-node="'+i+'">'+esc(N[i].n)+' <span class="dim">'+esc(N[i].o)+' '+esc(N[i].m||'')+
      '</span></div>';}).join('');markHits();return hits;}
function markHits(){var keys={};hits.forEach(function(i){if(shown(N[i]))keys[rep(N[i])]=1;});
  Array.prototype.forEach.call(svg.querySelectorAll('g.grp,g.node'),function(g){
    g.classList.toggle('hit',!!keys[g.getAttribute('data-key')]);});}
q.addEventListener('input',function(){search(q.value);});
q.addEventListener('keydown',function(e){if(e.key==='Enter'&&hits.length){reveal(hits[0]);}});
res.addEventListener('click',function(e){var d=e.target.closest('[data-node]');if(d){reveal(+d.getAttribute('data-node'));}});
function setMode(m){mode=m;document.getElementById('m-'+m).checked=true;body.setAttribute('data-mode',m);}
['after','before'].forEach(function(m){document.getElementById('m-'+m).addEventListener('change',function(){
  setMode(m);render();});});
document.getElementById('elabels').addEventListener('change',function(){render();});
document.getElementById('zin').onclick=function(){setZoom(zoom*1.25);};
document.getElementById('zout').onclick=function(){setZoom(zoom/1.25);};
document.getElementById('zfit').onclick=fit;
document.getElementById('xall').onclick=function(){expandAll();render();};
document.getElementById('xlayers').onclick=function(){collapseToLayers();render();fit();};
// the table: sort by a column, filter, click a row to find its node
var table=document.getElementById('nodes'),tbody=table.tBodies[0],heads=table.tHead.rows[0].cells,dir={};
function val(td){var v=td.getAttribute('data-v');return v===null?td.textContent:v;}
function sortBy(c){var kind=heads[c].getAttribute('data-kind'),d=dir[c]=dir[c]===1?-1:1;
  var rows=Array.prototype.slice.call(tbody.rows);
  rows.sort(function(a,b){var x=val(a.cells[c]),y=val(b.cells[c]);
    if(kind==='num'){x=x===''?-Infinity:parseFloat(x);y=y===''?-Infinity:parseFloat(y);return (x-y)*d;}
    return x.localeCompare(y,undefined,{numeric:true})*d;});
  var f=document.createDocumentFragment();rows.forEach(function(r){f.appendChild(r);});tbody.appendChild(f);
  for(var i=0;i<heads.length;i++){heads[i].className='';}heads[c].className=d===1?'asc':'desc';}
for(var i=0;i<heads.length;i++){(function(c){heads[c].addEventListener('click',function(){sortBy(c);});})(i);}
var filter=document.getElementById('filter'),only=document.getElementById('changedonly');
function applyFilter(){var s=filter.value.toLowerCase(),oc=only.checked,n=0;
  for(var i=0;i<tbody.rows.length;i++){var r=tbody.rows[i];
    var ok=(!oc||!r.classList.contains('none'))&&(!s||r.textContent.toLowerCase().indexOf(s)>=0);
    r.style.display=ok?'':'none';if(ok)n++;}
  document.getElementById('count').textContent=n+' of '+tbody.rows.length+' nodes';}
filter.addEventListener('input',applyFilter);only.addEventListener('change',applyFilter);
tbody.addEventListener('click',function(e){var r=e.target.closest('tr');if(r&&byName[r.getAttribute('data-name')]!==undefined){
  var x=N[byName[r.getAttribute('data-name')]];if(x.k!=='weight'){reveal(x.id);pic.scrollIntoView({block:'nearest'});}}});
applyFilter();
var t0=performance.now();collapseToLayers();setMode('after');render();
if(H*zoom>pic.clientHeight){fit();}
body.setAttribute('data-initial-ms',(performance.now()-t0).toFixed(0));
var want=/^#node=(.+)$/.exec(location.hash);  // a link to one node: #node=linear_3
if(want&&byName[decodeURIComponent(want[1])]!==undefined){reveal(byName[decodeURIComponent(want[1])]);}
body.setAttribute('data-table-rows',String(tbody.rows.length));
if(location.hash==='#perf'){expandAll();var t1=performance.now();render();svg.getBoundingClientRect();
  void pic.offsetHeight;var ms=performance.now()-t1;
  body.setAttribute('data-render-ms',ms.toFixed(0));body.setAttribute('data-render-ok',ms<3000?'1':'0');
  body.setAttribute('data-items',String(items.length));}
if(location.hash==='#selftest'){var problems=[];
  var g0=svg.querySelectorAll('g.grp').length,n0=svg.querySelectorAll('g.node').length;
  var first=svg.querySelector('g.grp');
  if(first){var k=first.getAttribute('data-key');first.dispatchEvent(new MouseEvent('click',{bubbles:true}));
    first.dispatchEvent(new MouseEvent('click',{bubbles:true}));
    if(svg.querySelectorAll('g.node').length<=n0){problems.push('expanding '+k+' drew no more nodes');}
    var fr=svg.querySelector('g.frame[data-group="'+k.slice(2)+'"] text.ft');
    if(!fr){problems.push('expanded '+k+' has no frame');}
    else{fr.dispatchEvent(new MouseEvent('click',{bubbles:true}));
      if(svg.querySelectorAll('g.grp').length!==g0){problems.push('collapsing '+k+' did not restore the view');}}}
  else if(N.length>400){problems.push('a large graph starts with no collapsed group');}
  var target=N.filter(function(x){return x.k==='cast'&&x.ch==='added';})[0]||N.filter(function(x){return x.k==='compute';})[0];
  if(target){q.value=target.n;q.dispatchEvent(new Event('input'));
    if(hits.indexOf(target.id)<0){problems.push('search did not find '+target.n);}
    q.dispatchEvent(new KeyboardEvent('keydown',{key:'Enter'}));
    var el=svg.querySelector('g.node.sel');
    if(!el||el.getAttribute('data-name')!==N[hits[0]].n){problems.push('Enter did not select the first hit');}
    if(panel.textContent.indexOf(N[hits[0]].n)<0){problems.push('the panel does not show the selected node');}
    if(N[hits[0]].why&&panel.textContent.indexOf(N[hits[0]].why.slice(0,20))<0){problems.push('the panel lacks the reason');}
    document.getElementById('m-before').click();
    if(target.ch==='added'&&svg.querySelector('g.node[data-name="'+target.n+'"]')){problems.push('before still shows an added cast');}
    document.getElementById('m-after').click();
    if(!svg.querySelector('g.node[data-name="'+target.n+'"]')){problems.push('after lost the revealed node');}}
  sortBy(0);sortBy(0);if(!(parseFloat(val(tbody.rows[0].cells[0]))>=parseFloat(val(tbody.rows[tbody.rows.length-1].cells[0])))){
    problems.push('descending sort by # failed');}
  body.setAttribute('data-selftest',problems.length?problems.join('; '):'ok');}
body.setAttribute('data-ready','1');
})();
"""
